// The demo chat page (SPEC §13, §15) on /client.js: rooms with their members, who is typing,
// who has read your messages, unread counts that follow the user. Message data is only ever
// shown with textContent, never parsed as HTML.
import { TrioChat, compareIds } from "/client.js";

const ROOM_ID = /^[A-Za-z0-9_.:-]{1,128}$/;
const STREAM_ID = /^\d+-\d+$/;
const PAGE = 50;
/** at most one typing signal per room this often (the server allows 5/s) */
const TYPING_EVERY_MS = 2000;
/** someone is typing until this long after their last signal (or their message) */
const TYPING_SHOWN_MS = 4000;
/** the rooms of a user in this browser, for the next Connect: `{rooms, open}` */
const REMEMBERED = "trio-chat.demo.rooms:";

/** @param {string} id */
const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));
const ui = {
  state: $("state"),
  login: /** @type {HTMLFormElement} */ ($("login")),
  name: /** @type {HTMLInputElement} */ ($("name")),
  connect: /** @type {HTMLButtonElement} */ ($("connect")),
  disconnect: /** @type {HTMLButtonElement} */ ($("disconnect")),
  loginError: $("login-error"),
  chat: $("chat"),
  join: /** @type {HTMLFormElement} */ ($("join")),
  room: /** @type {HTMLInputElement} */ ($("room")),
  rooms: $("rooms"),
  notice: $("notice"),
  view: $("room-view"),
  earlier: /** @type {HTMLButtonElement} */ ($("earlier")),
  messages: $("messages"),
  typing: $("typing"),
  compose: /** @type {HTMLFormElement} */ ($("compose")),
  message: /** @type {HTMLInputElement} */ ($("message")),
  members: $("members"),
  memberCount: $("member-count"),
};

/**
 * @typedef {object} RoomView
 * @property {HTMLLIElement[]} items the rendered messages, in id order
 * @property {Set<string>} ids
 * @property {boolean} more older messages remain (after the first history page)
 * @property {number} unread messages of others not read yet, while the room is not open
 * @property {HTMLLIElement} tab
 * @property {string | null} myRead this user's read marker (from any of their tabs)
 * @property {Map<string, string>} receipts the other users' read markers
 * @property {Map<string, any>} members user → the connect hook's info (null: none)
 * @property {number} count users in the room (beyond the listed ones when truncated)
 * @property {Set<any[]>} heard per presence() waiting for its answer, the events meanwhile
 * @property {Map<string, ReturnType<typeof setTimeout>>} typing users typing, until when
 * @property {number} typedAt when this tab last said it was typing here
 * @property {boolean} silent signals are refused here (off, or a read-only room): not sent
 */

/** @type {TrioChat | null} */
let chat = null;
let me = "";
/** @type {Map<string, RoomView>} */
const rooms = new Map();
/** @type {string | null} */
let current = null;
/** @type {string} why the last connection ended, if the server said */
let loggedOut = "";
/** @type {number | null} the close code of the connection being replaced */
let lostWith = null;
/** display names from the connect hook's `info.name`, by user id */
const names = new Map();
/** @type {Map<number, string>} the room of each recent typing signal, by ref */
const signals = new Map();

// --- connecting -------------------------------------------------------------------------

/**
 * A demo token for `user` from this page's server.
 * @param {string} user
 * @returns {Promise<{token: string, url: string}>}
 */
async function mintToken(user) {
  const response = await fetch("/demo/token", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ user }),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.message || `token refused (${response.status})`);
  return body;
}

ui.login.addEventListener("submit", async (event) => {
  event.preventDefault();
  const user = ui.name.value.trim();
  if (!user) return;
  setBusy(true);
  hide(ui.loginError);
  try {
    const first = await mintToken(user);
    let spare = /** @type {string | null} */ (first.token);
    // A token function: every reconnect and every token_expiring gets a fresh token.
    const token = async () => {
      const ready = spare;
      spare = null;
      return ready ?? (await mintToken(user)).token;
    };
    me = user;
    loggedOut = "";
    chat = listen(new TrioChat(first.url, { token }));
    const welcome = await chat.connect();
    if (typeof welcome.info?.name === "string") names.set(me, welcome.info.name);
    ui.chat.hidden = false;
    ui.disconnect.hidden = false;
    ui.room.focus();
    await rejoin();
  } catch (error) {
    chat?.close();
    chat = null;
    show(ui.loginError, `Could not connect: ${describe(error)}`);
    setBusy(false);
  }
});

ui.disconnect.addEventListener("click", () => {
  chat?.close();
});

/**
 * @param {TrioChat} client
 * @returns {TrioChat}
 */
function listen(client) {
  client.addEventListener("state", (event) => {
    const detail = /** @type {CustomEvent} */ (event).detail;
    if (client !== chat) return;
    const back = detail.state === "open" && ui.state.dataset.state === "reconnecting";
    showState(detail);
    if (detail.state === "closed") ended();
    // joins and leaves, reads and typing went by while away: ask again (after the rejoins)
    if (back) for (const room of rooms.keys()) catchUp(room);
  });
  client.addEventListener("message", (event) => {
    const frame = /** @type {CustomEvent} */ (event).detail;
    if (client === chat) addMessage(frame.room, frame);
  });
  /** @param {string} name @param {(frame: any) => void} handle */
  const on = (name, handle) =>
    client.addEventListener(name, (event) => {
      if (client === chat) handle(/** @type {CustomEvent} */ (event).detail);
    });
  on("presence_join", (frame) => heard(frame));
  on("presence_leave", (frame) => heard(frame));
  on("signal", (frame) => {
    if (frame.from !== me && frame.data && typeof frame.data === "object") {
      typing(frame.room, frame.from, frame.data.typing === true);
    }
  });
  on("read", (frame) => readBy(frame.room, frame.user, frame.id));
  client.addEventListener("direct", (event) => {
    const frame = /** @type {CustomEvent} */ (event).detail;
    if (client === chat && current) addMessage(current, { ...frame, direct: true });
  });
  client.addEventListener("gap", (event) => {
    const frame = /** @type {CustomEvent} */ (event).detail;
    const shown = frame.missed ? `; the latest ${frame.missed} are shown` : "";
    show(ui.notice, `Some messages in ${frame.room} could not be recovered after the reconnect${shown}.`);
  });
  client.addEventListener("logout", (event) => {
    loggedOut = /** @type {CustomEvent} */ (event).detail.reason || "logout";
  });
  client.addEventListener("error", (event) => {
    const frame = /** @type {CustomEvent} */ (event).detail;
    const room = signals.get(frame.ref);
    if (room !== undefined) {
      // typing is a nicety: a refusal is no news (a room that refuses signals gets no more)
      const view = rooms.get(room);
      if (view && frame.code !== "rate_limited") view.silent = true;
      return;
    }
    show(ui.notice, `Server error: ${frame.code}${frame.message ? ` (${frame.message})` : ""}`);
  });
  return client;
}

/** @param {{state: string, code?: number | null, welcome?: any, delay?: number}} detail */
function showState(detail) {
  // the first "reconnecting" after "open" has the close code; the failed attempts after it, not
  if (detail.state === "reconnecting" && ui.state.dataset.state === "open") {
    lostWith = detail.code ?? null;
  }
  const texts = {
    connecting: "Connecting…",
    open: `Connected as ${me}${detail.welcome ? ` (instance ${detail.welcome.instance})` : ""}`,
    reconnecting: `Reconnecting…${lostWith ? ` (closed with ${lostWith})` : ""}`,
    closed: loggedOut ? `Logged out (${loggedOut})` : "Disconnected",
  };
  ui.state.dataset.state = detail.state;
  ui.state.textContent = texts[/** @type {keyof texts} */ (detail.state)] ?? detail.state;
}

/** The session is over (logout, ban, Disconnect): back to the name form. */
function ended() {
  chat = null;
  setBusy(false);
  ui.disconnect.hidden = true;
  ui.compose.querySelector("button")?.setAttribute("disabled", "");
  ui.join.querySelector("button")?.setAttribute("disabled", "");
  ui.earlier.disabled = true;
  ui.name.focus();
}

/** @param {boolean} busy */
function setBusy(busy) {
  ui.name.disabled = busy;
  ui.connect.disabled = busy;
  if (!busy) return;
  // a new session: a clean slate
  rooms.clear();
  current = null;
  ui.rooms.replaceChildren();
  ui.messages.replaceChildren();
  ui.view.hidden = true;
  ui.typing.textContent = "";
  hide(ui.notice);
  ui.compose.querySelector("button")?.removeAttribute("disabled");
  ui.join.querySelector("button")?.removeAttribute("disabled");
}

// --- rooms ------------------------------------------------------------------------------

ui.join.addEventListener("submit", async (event) => {
  event.preventDefault();
  const room = ui.room.value.trim();
  if (!chat) return;
  if (!ROOM_ID.test(room)) {
    show(ui.notice, "A room name is 1-128 letters, digits or _ . : -");
    return;
  }
  hide(ui.notice);
  if (await enter(room, true)) ui.message.focus();
});

/**
 * Join `room` and show it, opened or as a tab with its unread count.
 * @param {string} room
 * @param {boolean} open
 * @returns {Promise<boolean>} whether it is joined
 */
async function enter(room, open) {
  if (!chat) return false;
  let joined;
  try {
    joined = await chat.join(room);
  } catch (error) {
    show(ui.notice, `Could not join ${room}: ${describe(error)}`);
    return false;
  }
  if (rooms.has(room)) {
    if (open) select(room);
    return true;
  }
  rooms.set(room, {
    items: [],
    ids: new Set(),
    more: false,
    unread: open ? 0 : Number(joined.unread) || 0,
    tab: makeTab(room),
    myRead: typeof joined.read === "string" ? joined.read : null,
    receipts: new Map(),
    members: new Map(),
    count: 0,
    heard: new Set(),
    typing: new Map(),
    typedAt: 0,
    silent: false,
  });
  remember();
  if (open) select(room, false);
  else renderTab(room);
  await Promise.all([loadHistory(room), catchUp(room)]);
  return rooms.has(room);
}

/** Join the rooms this user had in this browser, opening the one that was open. */
async function rejoin() {
  const saved = recall();
  for (const room of saved.rooms) {
    if (ROOM_ID.test(room) && chat) await enter(room, room === saved.open);
  }
  if (!current && rooms.size) select(rooms.keys().next().value);
  if (current) ui.message.focus();
}

/** Who is here and who has read what: asked on join and again after a reconnect. */
async function catchUp(room) {
  await Promise.all([loadPresence(room), loadReceipts(room)]);
}

/**
 * @param {string} room
 * @returns {HTMLLIElement}
 */
function makeTab(room) {
  const tab = document.createElement("li");
  const open = document.createElement("button");
  open.type = "button";
  open.className = "secondary";
  open.textContent = room;
  open.addEventListener("click", () => {
    select(room);
    ui.message.focus();
  });
  const leave = document.createElement("button");
  leave.type = "button";
  leave.className = "secondary leave";
  leave.textContent = "×";
  leave.setAttribute("aria-label", `Leave ${room}`);
  leave.addEventListener("click", () => leaveRoom(room));
  tab.append(open, leave);
  ui.rooms.append(tab);
  return tab;
}

/**
 * Open `room`: its messages, members and typists; it counts as read.
 * @param {string} room
 * @param {boolean} [refresh] ask who is here again (their events may be off in this room)
 */
function select(room, refresh = true) {
  const view = rooms.get(room);
  if (!view) return;
  const switched = current !== room;
  current = room;
  view.unread = 0;
  for (const name of rooms.keys()) renderTab(name);
  ui.view.hidden = false;
  ui.messages.setAttribute("aria-label", "Messages");
  ui.messages.replaceChildren(...view.items);
  ui.earlier.hidden = !view.more;
  ui.earlier.disabled = !chat;
  renderMembers(room);
  renderTyping(room);
  scrollDown(true);
  markRead(room);
  if (switched) remember();
  if (switched && refresh) loadPresence(room);
}

/** The tab of `room`: pressed when open, else its unread count. @param {string} room */
function renderTab(room) {
  const view = rooms.get(room);
  if (!view) return;
  const button = /** @type {HTMLButtonElement} */ (view.tab.firstElementChild);
  button.setAttribute("aria-pressed", String(room === current));
  button.textContent = room;
  if (view.unread && room !== current) {
    const badge = document.createElement("span");
    badge.className = "unread";
    badge.textContent = `${view.unread} new`;
    button.append(" ", badge); // its name reads "lobby 2 new"
  }
}

/** @param {string} room */
async function leaveRoom(room) {
  const view = rooms.get(room);
  if (!view) return;
  rooms.delete(room);
  view.tab.remove();
  for (const timer of view.typing.values()) clearTimeout(timer);
  remember();
  try {
    await chat?.leave(room);
  } catch {
    // gone already: nothing to leave
  }
  if (current === room) {
    current = null;
    const next = rooms.keys().next();
    if (next.done) {
      ui.view.hidden = true;
      ui.messages.replaceChildren();
      ui.typing.textContent = "";
    } else {
      select(next.value);
    }
  }
}

/**
 * The latest page of `room`'s history, or the page before the oldest message shown.
 * @param {string} room
 * @param {boolean} [earlier]
 */
async function loadHistory(room, earlier = false) {
  const view = rooms.get(room);
  if (!chat || !view) return;
  const oldest = view.items.find((item) => item.dataset.id)?.dataset.id;
  const options = earlier && oldest ? { before: oldest, limit: PAGE } : { limit: PAGE };
  const height = ui.messages.scrollHeight;
  try {
    const page = await chat.history(room, options);
    for (const frame of page.messages) addMessage(room, frame, { quiet: true });
    view.more = page.more;
  } catch (error) {
    show(ui.notice, `Could not load the history of ${room}: ${describe(error)}`);
    return;
  }
  renderTicks(room);
  if (current !== room) return;
  ui.earlier.hidden = !view.more;
  if (earlier) ui.messages.scrollTop += ui.messages.scrollHeight - height;
  else scrollDown(true);
  markRead(room);
}

ui.earlier.addEventListener("click", async () => {
  if (!current) return;
  ui.earlier.disabled = true;
  await loadHistory(current, true);
  ui.earlier.disabled = !chat;
  if (ui.earlier.hidden) ui.message.focus();
});

// --- messages ---------------------------------------------------------------------------

ui.compose.addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = ui.message.value;
  const room = current;
  if (!chat || !room || !text.trim()) return;
  try {
    const ack = await chat.send(room, { text });
    addMessage(room, { id: ack.id, ts: ack.ts, from: me, data: { text }, mine: true });
    if (ui.message.value === text) ui.message.value = "";
  } catch (error) {
    show(ui.notice, `Not sent: ${describe(error)}`);
  }
});

// "… is typing": a signal when the text changes, at most one per room every 2 s
ui.message.addEventListener("input", () => {
  const view = current ? rooms.get(current) : undefined;
  if (!chat || !current || !view || view.silent || !ui.message.value.trim()) return;
  const now = Date.now();
  if (now - view.typedAt < TYPING_EVERY_MS) return;
  view.typedAt = now;
  const ref = chat.signal(current, { typing: true });
  if (ref === null) return;
  signals.set(ref, current);
  if (signals.size > 32) signals.delete(signals.keys().next().value);
});

/**
 * Render a message in its room, in id order, once.
 * @param {string} room
 * @param {{id?: string, ts?: number, from?: string | null, data?: any, mine?: boolean,
 *   direct?: boolean}} frame
 * @param {{quiet?: boolean}} [options] quiet: history, not news
 */
function addMessage(room, frame, { quiet = false } = {}) {
  const view = rooms.get(room);
  if (!view) return;
  if (frame.id && !frame.direct) {
    if (view.ids.has(frame.id)) return;
    view.ids.add(frame.id);
  }
  const item = document.createElement("li");
  if (frame.id && !frame.direct) item.dataset.id = frame.id;
  if (frame.ts) item.dataset.time = new Date(frame.ts).toLocaleTimeString();
  // yours: sent from this tab, or from another one of yours
  if (frame.mine || (frame.from === me && !frame.direct)) item.className = "mine";
  else if (frame.direct) item.className = "direct";
  else if (frame.from === null || frame.from === undefined) item.className = "system";
  const from = document.createElement("span");
  from.className = "from";
  const who = frame.from ?? "admin";
  from.textContent = frame.direct ? `${who} → you` : who;
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = textOf(frame.data);
  item.append(from, ": ", text);

  // in id order: history pages come before, a late own ack may come after a later message
  let at = view.items.length;
  if (item.dataset.id) {
    while (at > 0) {
      const before = view.items[at - 1].dataset.id;
      if (!before || compareIds(before, item.dataset.id) < 0) break;
      at -= 1;
    }
  }
  view.items.splice(at, 0, item);
  if (item.className === "mine") renderTicks(room, [item]);
  // their message ends their typing
  if (!frame.direct && frame.from && view.typing.has(frame.from)) typing(room, frame.from, false);
  if (room === current) {
    const stick = nearBottom();
    ui.messages.insertBefore(item, ui.messages.children[at] ?? null);
    if (!quiet) {
      scrollDown(stick || Boolean(frame.mine));
      markRead(room);
    }
  } else if (!quiet && item.className !== "mine" && !frame.direct) {
    view.unread += 1;
    renderTab(room);
  }
}

// --- read markers -----------------------------------------------------------------------

/** The page is looked at: shown, and its window focused. */
function attentive() {
  return document.visibilityState === "visible" && document.hasFocus();
}

/**
 * Move this user's read marker to the latest message of `room` if it is open and looked at.
 * @param {string} room
 */
function markRead(room) {
  const view = rooms.get(room);
  if (!chat || !view || room !== current || !attentive()) return;
  const latest = view.items.findLast((item) => item.dataset.id)?.dataset.id;
  if (!latest || (view.myRead !== null && !after(latest, view.myRead))) return;
  view.myRead = latest;
  chat.read(room, latest);
}

document.addEventListener("visibilitychange", () => current && markRead(current));
window.addEventListener("focus", () => current && markRead(current));

/**
 * A read marker moved: someone saw your messages, or you read the room in another tab.
 * @param {string} room
 * @param {string} user
 * @param {string} id
 */
function readBy(room, user, id) {
  const view = rooms.get(room);
  if (!view || typeof id !== "string") return;
  if (user === me) {
    if (view.myRead === null || after(id, view.myRead)) view.myRead = id;
    // what is left unread after it, of what is shown (the badge only goes down)
    const left = view.items.filter(
      (item) => item.dataset.id && item.className !== "mine" && after(item.dataset.id, id),
    ).length;
    if (left < view.unread) {
      view.unread = left;
      renderTab(room);
    }
    return;
  }
  const known = view.receipts.get(user);
  if (known !== undefined && !after(id, known)) return;
  view.receipts.set(user, id);
  renderTicks(room);
}

/** @param {string} room */
async function loadReceipts(room) {
  if (!chat || !rooms.has(room)) return;
  let answer;
  try {
    answer = await chat.receipts(room);
  } catch (error) {
    if (rooms.has(room)) show(ui.notice, `Could not load who has read ${room}: ${describe(error)}`);
    return;
  }
  for (const [user, id] of Object.entries(answer.read ?? {})) readBy(room, user, String(id));
}

/**
 * "seen by N" on your messages (all of them, or those given): N other users' markers are at
 * or after it.
 * @param {string} room
 * @param {HTMLLIElement[]} [items]
 */
function renderTicks(room, items) {
  const view = rooms.get(room);
  if (!view) return;
  for (const item of items ?? view.items) {
    const id = item.dataset.id;
    if (item.className !== "mine" || !id) continue;
    let seen = 0;
    for (const marker of view.receipts.values()) if (marker === id || after(marker, id)) seen += 1;
    if (seen) item.dataset.seen = `seen by ${seen}`;
    else delete item.dataset.seen;
  }
}

/**
 * Whether message id `a` comes after `b`: stream ids `<ms>-<seq>` part by part; other ids
 * (history off) have no order, and only differ.
 * @param {string} a
 * @param {string} b
 */
function after(a, b) {
  if (STREAM_ID.test(a) && STREAM_ID.test(b)) return compareIds(a, b) > 0;
  return a !== b;
}

// --- members and typing -----------------------------------------------------------------

/** @param {string} room */
async function loadPresence(room) {
  const view = rooms.get(room);
  if (!chat || !view) return;
  // events that cross the answer are applied again on top of it: it is a moment between the
  // request and its reply, and replaying an event that it already holds changes nothing
  /** @type {any[]} */
  const crossed = [];
  view.heard.add(crossed);
  let answer;
  try {
    answer = await chat.presence(room);
  } catch (error) {
    if (rooms.get(room) === view) show(ui.notice, `Could not load who is in ${room}: ${describe(error)}`);
    return;
  } finally {
    view.heard.delete(crossed);
  }
  if (rooms.get(room) !== view) return; // left meanwhile
  view.members = new Map();
  for (const entry of answer.users ?? []) {
    view.members.set(entry.user, entry.info ?? null);
    learnName(entry.user, entry.info);
  }
  view.count = Math.max(Number(answer.count) || 0, view.members.size);
  for (const frame of crossed) applyPresence(view, frame);
  if (room === current) renderMembers(room);
}

/** A `presence_join` or `presence_leave`. @param {any} frame */
function heard(frame) {
  const view = rooms.get(frame.room);
  if (!view) return;
  for (const crossed of view.heard) crossed.push(frame);
  applyPresence(view, frame);
  if (frame.type === "presence_leave") typing(frame.room, frame.user, false);
  if (frame.room === current) renderMembers(frame.room);
}

/**
 * @param {RoomView} view
 * @param {any} frame
 */
function applyPresence(view, frame) {
  if (frame.type === "presence_join") {
    if (!view.members.has(frame.user)) view.count += 1;
    view.members.set(frame.user, frame.info ?? null);
    learnName(frame.user, frame.info);
  } else if (frame.type === "presence_leave") {
    if (view.members.delete(frame.user)) view.count -= 1;
  }
}

/**
 * @param {string} user
 * @param {any} info
 */
function learnName(user, info) {
  if (info && typeof info.name === "string" && info.name.trim()) names.set(user, info.name.trim());
}

/** @param {string} user */
function nameOf(user) {
  return names.get(user) ?? user;
}

/** The member list of the open room, by name, you first. @param {string} room */
function renderMembers(room) {
  const view = rooms.get(room);
  if (!view || room !== current) return;
  const users = [...view.members.keys()].sort((a, b) =>
    a === me ? -1 : b === me ? 1 : nameOf(a).localeCompare(nameOf(b)),
  );
  const items = users.map((user) => {
    const item = document.createElement("li");
    item.textContent = nameOf(user);
    if (nameOf(user) !== user) {
      const id = document.createElement("span");
      id.className = "muted";
      id.textContent = ` @${user}`;
      item.append(id);
    }
    if (user === me) {
      item.className = "me";
      item.append(" (you)");
    }
    return item;
  });
  const unlisted = view.count - view.members.size;
  if (unlisted > 0) {
    const more = document.createElement("li");
    more.className = "muted";
    more.textContent = `and ${unlisted} more`;
    items.push(more);
  }
  ui.members.replaceChildren(...items);
  ui.memberCount.textContent = `(${view.count})`;
}

/**
 * `user` is typing in `room` (for a while), or not any more.
 * @param {string} room
 * @param {string} user
 * @param {boolean} active
 */
function typing(room, user, active) {
  const view = rooms.get(room);
  if (!view) return;
  clearTimeout(view.typing.get(user));
  if (active) view.typing.set(user, setTimeout(() => typing(room, user, false), TYPING_SHOWN_MS));
  else view.typing.delete(user);
  renderTyping(room);
}

/** @param {string} room */
function renderTyping(room) {
  const view = rooms.get(room);
  if (!view || room !== current) return;
  const who = [...view.typing.keys()].map(nameOf);
  let text = "";
  if (who.length === 1) text = `${who[0]} is typing…`;
  else if (who.length === 2) text = `${who[0]} and ${who[1]} are typing…`;
  else if (who.length > 2) text = `${who[0]}, ${who[1]} and ${who.length - 2} more are typing…`;
  if (ui.typing.textContent !== text) ui.typing.textContent = text;
}

// --- the rooms of a user, kept in this browser -------------------------------------------

/** @returns {{rooms: string[], open: string | null}} */
function recall() {
  try {
    const saved = JSON.parse(localStorage.getItem(REMEMBERED + me) ?? "null");
    if (saved && Array.isArray(saved.rooms)) {
      return { rooms: saved.rooms.filter((r) => typeof r === "string"), open: saved.open ?? null };
    }
  } catch {
    // unreadable or not allowed: start afresh
  }
  return { rooms: [], open: null };
}

function remember() {
  if (!me) return;
  try {
    localStorage.setItem(REMEMBERED + me, JSON.stringify({ rooms: [...rooms.keys()], open: current }));
  } catch {
    // storage full or not allowed: the rooms are not remembered
  }
}

/** @param {any} data */
function textOf(data) {
  if (typeof data === "string") return data;
  if (data && typeof data === "object" && typeof data.text === "string") return data.text;
  return JSON.stringify(data);
}

function nearBottom() {
  const list = ui.messages;
  return list.scrollHeight - list.scrollTop - list.clientHeight < 40;
}

/** @param {boolean} really */
function scrollDown(really) {
  if (really) ui.messages.scrollTop = ui.messages.scrollHeight;
}

// --- little things ----------------------------------------------------------------------

/**
 * @param {HTMLElement} element
 * @param {string} text
 */
function show(element, text) {
  element.textContent = text;
  element.hidden = false;
}

/** @param {HTMLElement} element */
function hide(element) {
  element.hidden = true;
  element.textContent = "";
}

/** @param {unknown} error */
function describe(error) {
  if (error && typeof error === "object" && "code" in error) {
    const { code, message } = /** @type {{code: string, message: string}} */ (error);
    return message && message !== code ? `${code}: ${message}` : code;
  }
  return error instanceof Error ? error.message : String(error);
}

ui.name.focus();
