// trio-chat browser client (SPEC §13): one ES module, no dependencies, no build step.
//
//   import { TrioChat } from "/client.js";
//   const chat = new TrioChat("ws://127.0.0.1:8765/", { token: async () => fetchToken() });
//   chat.addEventListener("message", (event) => show(event.detail));
//   await chat.connect();
//   await chat.join("lobby");
//   const ack = await chat.send("lobby", { text: "hello" }); // ack.id = what the others see
//   chat.signal("lobby", { typing: true });                  // ephemeral, no reply
//   chat.read("lobby", ack.id);                              // the user's read marker

/**
 * A frame from the server: a JSON object with a `type` (SPEC §6).
 * @typedef {{type: string, [field: string]: any}} Frame
 */

/**
 * A JWT, or a function returning one (a promise of one): called before every connection
 * and again on `token_expiring` (its result is sent as `refresh`).
 * @typedef {string | (() => string | Promise<string>)} TokenSource
 */

/**
 * @typedef {object} TrioChatOptions
 * @property {TokenSource} token the credential, offered as the `bearer.<jwt>` subprotocol
 * @property {number} [minDelay] first reconnect delay in ms (default 250), doubled per
 *   failed attempt, each delay jittered down by up to half
 * @property {number} [maxDelay] longest reconnect delay in ms (default 5000)
 */

/**
 * `closed` before `connect()`, after `close()` and after a final close (logout, ban).
 * @typedef {"connecting" | "open" | "reconnecting" | "closed"} ConnectionState
 */

/** The WebSocket subprotocol of trio-chat. */
export const SUBPROTOCOL = "trio-chat.v1";
/** Close codes after which reconnecting is pointless: logged out or kicked, banned. */
const FINAL_CLOSES = new Set([4000, 4403]);
/** Token expired or revoked: final unless a token function can give a fresh one. */
const TOKEN_CLOSE = 4401;
/** A rejoin `since` for a room that was empty when joined: replay it from its start. */
const START = "0-0";
const STREAM_ID = /^(\d+)-(\d+)$/;

/**
 * The error a request is rejected with: `code` is the server's `error` code (`not_in_room`,
 * `muted`, `rate_limited`, ...), or `disconnected` (the socket dropped before the reply;
 * the request may or may not have been acted on), or `closed` (the client is closed).
 */
export class TrioChatError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {Frame | null} [frame] the server's `error` frame, if any
   */
  constructor(code, message, frame = null) {
    super(message);
    this.name = "TrioChatError";
    /** @type {string} */
    this.code = code;
    /** @type {Frame | null} */
    this.frame = frame;
  }
}

/**
 * A trio-chat connection that reconnects by itself.
 *
 * Events (`addEventListener`; the frame, or an object, in `event.detail`):
 * - `message`: a room message, live or replayed after a reconnect (each id once per room);
 * - `direct`: a direct message;
 * - `state`: `{state, code?, reason?, delay?, welcome?}` on every change of {@link state};
 * - `gap`: `{room, recovered: false, missed}` when a rejoin after a reconnect could not
 *   bring back everything that was missed (the latest messages still come as `message`);
 * - `logout`: `{reason}` just before the server ends the session for good;
 * - `presence_join`: `{room, user, info}` when a user's first session enters a joined room,
 *   `presence_leave`: `{room, user}` when their last one leaves it (per user, not per device;
 *   only in rooms with the `presence_events` option);
 * - `signal`: `{room, from, data}`, another session's {@link signal} (your other devices'
 *   too): never stored, never replayed;
 * - `read`: `{room, user, id}`, a user's read marker moved forward, `user` being yours when
 *   another of your sessions read the room (clear its badge);
 * - `error`: an `error` frame that answers no request of yours (or a failed rejoin/refresh):
 *   the refusal of a {@link signal} or {@link read} carries the `ref` the call returned;
 * - `token_expiring`, `refreshed`: the token's life (a token function is called for you).
 *
 * After any close but 4000 and 4403 (and 4401 when `token` is a plain string) it connects
 * again with jittered exponential backoff and rejoins every room with `since`, the last
 * message id it saw there, so the server replays what was missed.
 */
export class TrioChat extends EventTarget {
  #url;
  #token;
  #minDelay;
  #maxDelay;
  /** @type {WebSocket | null} */
  #ws = null;
  /** @type {ConnectionState} */
  #state = "closed";
  /** @type {Frame | null} */
  #welcome = null;
  #refs = 0;
  /** @type {Map<number, Pending>} requests waiting for their reply, by ref */
  #pending = new Map();
  /** @type {Map<string, Room>} joined rooms */
  #rooms = new Map();
  /** @type {Map<string, string>} read markers asked while disconnected, by room: sent on open */
  #reads = new Map();
  /** @type {Array<{resolve: (welcome: Frame) => void, reject: (error: Error) => void}>} */
  #waiters = [];
  /** bumped by every (re)connect and close: late callbacks of older ones are ignored */
  #generation = 0;
  #delay = 0;
  /** @type {ReturnType<typeof setTimeout> | undefined} */
  #retry;
  /** @type {ReturnType<typeof setInterval> | undefined} */
  #watchdog;
  #heardAt = 0;
  #pingedAt = 0;
  /** a welcome came since connect(): drops are reconnected, not reported as failures */
  #established = false;

  /**
   * @param {string} url the WebSocket URL, e.g. `ws://127.0.0.1:8765/`
   * @param {TrioChatOptions} options
   */
  constructor(url, { token, minDelay = 250, maxDelay = 5000 }) {
    super();
    if (typeof token !== "string" && typeof token !== "function") {
      throw new TypeError("token must be a string or a function");
    }
    this.#url = url;
    this.#token = token;
    this.#minDelay = minDelay;
    this.#maxDelay = maxDelay;
  }

  /** @returns {ConnectionState} */
  get state() {
    return this.#state;
  }

  /** The `welcome` of the current (or last) connection. @returns {Frame | null} */
  get welcome() {
    return this.#welcome;
  }

  /** The rooms joined (rejoined after every reconnect). @returns {string[]} */
  get rooms() {
    return [...this.#rooms.keys()];
  }

  /**
   * Open the connection (if it is not open or opening already).
   * @returns {Promise<Frame>} the `welcome`; rejected (code `connect_failed`) if the first
   *   attempt fails before it, or (code `closed`) if {@link close} is called meanwhile
   */
  connect() {
    if (this.#state === "open" && this.#welcome) return Promise.resolve(this.#welcome);
    const promise = new Promise((resolve, reject) => this.#waiters.push({ resolve, reject }));
    if (this.#state === "closed") {
      this.#established = false;
      this.#delay = 0;
      this.#open("connecting");
    }
    return promise;
  }

  /**
   * Join a room; it is rejoined after every reconnect until {@link leave}.
   * @param {string} room 1-128 chars of `[A-Za-z0-9_.:-]`
   * @returns {Promise<Frame>} the `joined` frame: `read` is your read marker there (null
   *   without one), `unread` how many messages the room holds after it (null without history)
   */
  join(room) {
    return this.#request({ type: "join", room });
  }

  /**
   * @param {string} room
   * @returns {Promise<Frame>} the `left` frame
   */
  leave(room) {
    this.#rooms.delete(room);
    this.#reads.delete(room);
    return this.#request({ type: "leave", room });
  }

  /**
   * Send a message to a joined room.
   * @param {string} room
   * @param {any} data any JSON value
   * @returns {Promise<Frame>} the `ack {id, ts}`: `id` is the id the others see
   */
  send(room, data) {
    return this.#request({ type: "send", room, data });
  }

  /**
   * Send to every session of a user (not stored: never replayed).
   * @param {string} to the user id
   * @param {any} data any JSON value
   * @returns {Promise<Frame>} the `ack`
   */
  direct(to, data) {
    return this.#request({ type: "direct", to, data });
  }

  /**
   * A page of a joined room's history, oldest first.
   * @param {string} room
   * @param {{before?: string, limit?: number}} [options] `before`: a message id (default: the
   *   latest messages); `limit`: 1-100 (default 50)
   * @returns {Promise<Frame>} `history {room, messages, more}`
   */
  history(room, { before, limit } = {}) {
    /** @type {Frame} */
    const frame = { type: "history", room };
    if (before !== undefined) frame.before = before;
    if (limit !== undefined) frame.limit = limit;
    return this.#request(frame);
  }

  /**
   * Who is in a joined room, on every instance: one entry per user, not per device.
   * @param {string} room
   * @returns {Promise<Frame>} `presence {room, users: [{user, info, sessions}], count}`:
   *   `info` is what the application's connect hook said of the user (null without one);
   *   `truncated: true` when `count` is beyond the 1,000 users listed
   */
  presence(room) {
    return this.#request({ type: "presence", room });
  }

  /**
   * Tell the other sessions in a joined room something fleeting ("typing"): they get a
   * `signal {room, from, data}` event, now or never (not stored, not replayed, not queued
   * while disconnected). The server does not answer; a refusal (`rate_limited` beyond about
   * 5 a second, `forbidden`, `not_in_room`, `too_large`) comes as an `error` event whose
   * frame's `ref` is the number returned.
   * @param {string} room
   * @param {any} data any JSON value, at most 1 KiB
   * @returns {number | null} the frame's `ref`, or null when not connected (dropped)
   */
  signal(room, data) {
    return this.#fire({ type: "signal", room, data });
  }

  /**
   * Move your read marker in a joined room forward to the message `id` (a marker that is
   * not newer than yours changes nothing). The room's members and your other sessions get
   * a `read {room, user, id}` event. The server does not answer; a refusal (`bad_request`
   * for an id the room does not have, `not_in_room`) comes as an `error` event whose frame's
   * `ref` is the number returned. While disconnected, the latest marker asked per room is
   * kept and sent after the rejoin.
   * @param {string} room
   * @param {string} id a message id of that room
   * @returns {number | null} the frame's `ref`, or null when it waits for the connection
   */
  read(room, id) {
    const ref = this.#fire({ type: "read", room, id });
    if (ref === null && this.#state !== "closed") {
      const waiting = this.#reads.get(room);
      if (waiting === undefined || compareIds(id, waiting) > 0) this.#reads.set(room, id);
    }
    return ref;
  }

  /**
   * Every read marker of a joined room, to show who has seen what: a user has read a
   * message when their marker is at or after its id ({@link compareIds}).
   * @param {string} room
   * @returns {Promise<Frame>} `receipts {room, read: {user: id, ...}}`
   */
  receipts(room) {
    return this.#request({ type: "receipts", room });
  }

  /** @returns {Promise<Frame>} the `pong` */
  ping() {
    return this.#request({ type: "ping" });
  }

  /** Close the connection for good (no reconnect); requests waiting are rejected. */
  close() {
    this.#generation++;
    clearTimeout(this.#retry);
    const ws = this.#detach();
    if (ws) ws.close(1000, "client closed");
    this.#end({ code: 1000, reason: "client closed" });
  }

  // --- requests -------------------------------------------------------------------------

  /**
   * Send `frame` with a fresh ref now, or as soon as the next connection opens.
   * @param {Frame} frame
   * @param {boolean} [rejoin] a rejoin after a reconnect (internal)
   * @returns {Promise<Frame>}
   */
  #request(frame, rejoin = false) {
    if (this.#state === "closed") {
      return Promise.reject(new TrioChatError("closed", "the client is closed"));
    }
    const ref = ++this.#refs;
    return new Promise((resolve, reject) => {
      /** @type {Pending} */
      const pending = { frame: { ...frame, ref }, rejoin, sent: false, resolve, reject };
      this.#pending.set(ref, pending);
      if (this.#state === "open") this.#write(pending);
    });
  }

  /**
   * Write a frame that has no reply now, with a fresh ref, if the connection is open.
   * @param {Frame} frame
   * @returns {number | null} the ref, null when not written
   */
  #fire(frame) {
    const ws = this.#ws;
    if (this.#state !== "open" || !ws || ws.readyState !== WebSocket.OPEN) return null;
    const ref = ++this.#refs;
    ws.send(JSON.stringify({ ...frame, ref }));
    return ref;
  }

  /** @param {Pending} pending */
  #write(pending) {
    const ws = this.#ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    pending.sent = true;
    ws.send(JSON.stringify(pending.frame));
  }

  /**
   * Settle the request `frame` answers, if any.
   * @param {Frame} frame
   * @returns {boolean} whether it answered one
   */
  #settle(frame) {
    const pending = typeof frame.ref === "number" ? this.#pending.get(frame.ref) : undefined;
    if (!pending || !pending.sent) return false;
    this.#pending.delete(frame.ref);
    const asked = pending.frame;
    if (frame.type === "error") {
      if (pending.rejoin) this.#rooms.delete(asked.room); // not joined on this connection
      pending.reject(new TrioChatError(frame.code, frame.message, frame));
      return true;
    }
    if (asked.type === "join" && frame.type === "joined") this.#joined(asked.room, pending, frame);
    // a join answered after a later leave() was sent must not bring the room back
    if (asked.type === "leave") this.#rooms.delete(asked.room);
    if (asked.type === "send" && frame.type === "ack") {
      const room = this.#rooms.get(asked.room);
      // the replay after a reconnect carries our own messages: they are dropped by id
      if (room && parseId(frame.id)) room.own.add(frame.id);
    }
    pending.resolve(frame);
    return true;
  }

  /**
   * @param {string} name
   * @param {Pending} pending
   * @param {Frame} frame
   */
  #joined(name, pending, frame) {
    let room = this.#rooms.get(name);
    if (!room) {
      room = { last: null, mark: null, own: new Set() };
      this.#rooms.set(name, room);
    }
    const since = pending.frame.since;
    // A rejoin without since (nothing known of the room yet) cannot vouch either.
    if (pending.rejoin && frame.recovered !== true && since !== START) {
      this.#emit("gap", { recovered: false, missed: 0, ...frame });
    }
    if (since === undefined && room.last === null && room.mark === null && "last" in frame) {
      // `joined` names the room's latest message (null: none yet), so that a rejoin can ask
      // for what follows it even if nothing is said here before the connection drops.
      room.mark = frame.last ?? START;
    }
  }

  // --- the connection ---------------------------------------------------------------------

  /** @param {ConnectionState} state */
  async #open(state) {
    const generation = ++this.#generation;
    if (state !== this.#state) this.#setState({ state });
    let token;
    try {
      token = typeof this.#token === "function" ? await this.#token() : this.#token;
    } catch (error) {
      if (generation === this.#generation) this.#dropped(null, `token: ${error}`);
      return;
    }
    if (generation !== this.#generation) return;
    let ws;
    try {
      ws = new WebSocket(this.#url, [SUBPROTOCOL, `bearer.${token}`]);
    } catch (error) {
      this.#dropped(null, String(error)); // a malformed URL or token
      return;
    }
    this.#ws = ws;
    ws.onmessage = (event) => {
      if (ws === this.#ws) this.#receive(event.data);
    };
    ws.onclose = (event) => {
      if (ws !== this.#ws) return;
      this.#detach();
      this.#dropped(event.code, event.reason);
    };
  }

  /** @param {unknown} data */
  #receive(data) {
    this.#heardAt = Date.now();
    /** @type {Frame} */
    let frame;
    try {
      frame = JSON.parse(String(data));
    } catch {
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    switch (frame.type) {
      case "welcome":
        this.#opened(frame);
        return;
      case "message":
        this.#message(frame);
        return;
      case "direct":
      case "logout":
      case "presence_join":
      case "presence_leave":
      case "signal":
      case "read":
        this.#emit(frame.type, frame);
        return;
      case "token_expiring":
        this.#emit(frame.type, frame);
        this.#refresh();
        return;
    }
    if (this.#settle(frame)) return;
    if (frame.type === "error") this.#emit("error", frame);
  }

  /** @param {Frame} welcome */
  #opened(welcome) {
    this.#welcome = welcome;
    this.#established = true;
    this.#delay = 0;
    this.#state = "open";
    // Rejoins first, then what was asked while disconnected, in order.
    const waiting = [...this.#pending.values()].filter((pending) => !pending.sent);
    for (const [room, state] of this.#rooms) {
      const since = sinceOf(state);
      /** @type {Frame} */
      const frame = { type: "join", room };
      if (since !== null) frame.since = since;
      this.#request(frame, true).catch((error) => {
        if (error.code === "disconnected" || error.code === "closed") return;
        this.#emit("error", error.frame ?? { type: "error", code: error.code, room });
      });
    }
    for (const pending of waiting) this.#write(pending);
    for (const [room, id] of this.#reads) this.#fire({ type: "read", room, id });
    this.#reads.clear();
    this.#startWatchdog((Number(welcome.heartbeat) || 20) * 1000);
    this.#setState({ state: "open", welcome });
    for (const waiter of this.#waiters.splice(0)) waiter.resolve(welcome);
  }

  /** @param {Frame} frame */
  #message(frame) {
    const room = this.#rooms.get(frame.room);
    if (room) {
      // Ids are `<ms>-<seq>`, ordered within a room: one at or before the last seen is a
      // repeat (the server promises none; this is a seatbelt).
      if (room.last !== null && compareIds(frame.id, room.last) <= 0) return;
      room.last = frame.id;
      for (const id of room.own) {
        if (compareIds(id, frame.id) < 0) room.own.delete(id);
      }
      if (room.own.delete(frame.id)) return; // our own send, replayed: send() had its ack
    }
    this.#emit("message", frame);
  }

  async #refresh() {
    if (typeof this.#token !== "function") return;
    const generation = this.#generation;
    let token;
    try {
      token = await this.#token();
    } catch (error) {
      this.#emit("error", { type: "error", code: "token", message: String(error) });
      return;
    }
    if (generation !== this.#generation || this.#state !== "open") return;
    try {
      this.#emit("refreshed", await this.#request({ type: "refresh", token }));
    } catch (error) {
      // refused: the server closes with 4401 and we come back with a fresh token
      if (error instanceof TrioChatError && error.frame) this.#emit("error", error.frame);
    }
  }

  /**
   * The socket is gone: fail what was sent on it, then reconnect or stop.
   * @param {number | null} code the close code, null when there was no socket
   * @param {string} reason
   */
  #dropped(code, reason) {
    this.#failSent();
    const final =
      (code !== null && FINAL_CLOSES.has(code)) ||
      (code === TOKEN_CLOSE && typeof this.#token === "string");
    if (final || !this.#established) {
      this.#end({ code, reason }, final ? "closed" : "connect_failed");
      return;
    }
    this.#delay = Math.min(Math.max(this.#delay * 2, this.#minDelay), this.#maxDelay);
    const delay = Math.round(this.#delay * (0.5 + Math.random() * 0.5));
    this.#setState({ state: "reconnecting", code, reason, delay });
    const generation = ++this.#generation;
    this.#retry = setTimeout(() => {
      if (generation === this.#generation) this.#open("reconnecting");
    }, delay);
  }

  /**
   * Stop for good: every request and connect() waiting is rejected.
   * @param {{code: number | null, reason: string}} why
   * @param {string} [code] the waiting connect()s' rejection code
   */
  #end(why, code = "closed") {
    this.#failSent();
    this.#reads.clear();
    for (const [ref, pending] of this.#pending) {
      this.#pending.delete(ref);
      pending.reject(new TrioChatError("closed", "the client is closed"));
    }
    const message = `connection closed (${why.code ?? "no socket"} ${why.reason || ""})`.trim();
    for (const waiter of this.#waiters.splice(0)) {
      waiter.reject(new TrioChatError(code, message));
    }
    if (this.#state !== "closed") this.#setState({ state: "closed", ...why });
  }

  #failSent() {
    for (const [ref, pending] of this.#pending) {
      if (!pending.sent) continue;
      this.#pending.delete(ref);
      pending.reject(new TrioChatError("disconnected", "the connection dropped before the reply"));
    }
  }

  /** @returns {WebSocket | null} the socket, no longer listened to */
  #detach() {
    clearInterval(this.#watchdog);
    const ws = this.#ws;
    this.#ws = null;
    if (ws) ws.onmessage = ws.onclose = null;
    return ws;
  }

  /**
   * A connection that hears nothing (the network went away without a close) is found out:
   * after `heartbeat` ms of silence a `ping`; no answer within as long again, a reconnect.
   * @param {number} heartbeat
   */
  #startWatchdog(heartbeat) {
    clearInterval(this.#watchdog);
    this.#heardAt = Date.now();
    this.#pingedAt = 0;
    this.#watchdog = setInterval(() => {
      const now = Date.now();
      if (this.#pingedAt > this.#heardAt && now - this.#pingedAt > heartbeat) {
        const ws = this.#detach();
        if (ws) ws.close(4000, "no answer");
        this.#dropped(null, "no answer to ping");
      } else if (now - this.#heardAt > heartbeat && this.#pingedAt <= this.#heardAt) {
        this.#pingedAt = now;
        this.#ws?.send(JSON.stringify({ type: "ping" }));
      }
    }, heartbeat / 2);
  }

  /** @param {{state: ConnectionState, [field: string]: any}} detail */
  #setState(detail) {
    this.#state = detail.state;
    this.#emit("state", detail);
  }

  /**
   * @param {string} name
   * @param {any} detail
   */
  #emit(name, detail) {
    this.dispatchEvent(new CustomEvent(name, { detail }));
  }
}

/**
 * @typedef {object} Pending
 * @property {Frame} frame the request, with its ref
 * @property {boolean} rejoin a rejoin after a reconnect
 * @property {boolean} sent written on the current socket
 * @property {(frame: Frame) => void} resolve
 * @property {(error: Error) => void} reject
 */

/**
 * @typedef {object} Room
 * @property {string | null} last the last message id seen here
 * @property {string | null} mark the room's latest id when joined ("0-0": it was empty)
 * @property {Set<string>} own ids of our sends not yet passed by `last`
 */

/**
 * What to rejoin `room` with: the last id seen; else the latest when joined; else just
 * before our first send; else nothing (a plain join).
 * @param {Room} room
 * @returns {string | null}
 */
function sinceOf(room) {
  if (room.last !== null) return room.last;
  if (room.mark !== null) return room.mark;
  let first = null;
  for (const id of room.own) {
    if (first === null || compareIds(id, first) < 0) first = id;
  }
  const parsed = first === null ? null : parseId(first);
  if (!parsed) return null;
  const [ms, seq] = parsed;
  if (seq > 0n) return `${ms}-${seq - 1n}`;
  return ms > 0n ? `${ms - 1n}-18446744073709551615` : START;
}

/**
 * @param {unknown} id
 * @returns {[bigint, bigint] | null} `<ms>-<seq>` as numbers, null for anything else
 */
function parseId(id) {
  const match = typeof id === "string" ? STREAM_ID.exec(id) : null;
  return match ? [BigInt(match[1]), BigInt(match[2])] : null;
}

/**
 * Order two stream ids; ids that are not `<ms>-<seq>` (history off) count as newer.
 * @param {unknown} a
 * @param {unknown} b
 * @returns {number} negative, 0 or positive
 */
export function compareIds(a, b) {
  const x = parseId(a);
  const y = parseId(b);
  if (!x || !y) return 1;
  if (x[0] !== y[0]) return x[0] < y[0] ? -1 : 1;
  return x[1] === y[1] ? 0 : x[1] < y[1] ? -1 : 1;
}
