// The demo chat page (SPEC §13) on /client.js. Message data is only ever shown with
// textContent, never parsed as HTML.
import { TrioChat, compareIds } from "/client.js";

const ROOM_ID = /^[A-Za-z0-9_.:-]{1,128}$/;
const PAGE = 50;

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
  compose: /** @type {HTMLFormElement} */ ($("compose")),
  message: /** @type {HTMLInputElement} */ ($("message")),
};

/**
 * @typedef {object} RoomView
 * @property {HTMLLIElement[]} items the rendered messages, in id order
 * @property {Set<string>} ids
 * @property {boolean} more older messages remain (after the first history page)
 * @property {number} unread
 * @property {HTMLLIElement} tab
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
    await chat.connect();
    ui.chat.hidden = false;
    ui.disconnect.hidden = false;
    ui.room.focus();
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
    showState(detail);
    if (detail.state === "closed") ended();
  });
  client.addEventListener("message", (event) => {
    const frame = /** @type {CustomEvent} */ (event).detail;
    if (client === chat) addMessage(frame.room, frame);
  });
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
  try {
    await chat.join(room);
  } catch (error) {
    show(ui.notice, `Could not join ${room}: ${describe(error)}`);
    return;
  }
  if (!rooms.has(room)) {
    rooms.set(room, { items: [], ids: new Set(), more: false, unread: 0, tab: makeTab(room) });
    select(room);
    await loadHistory(room);
  } else {
    select(room);
  }
  ui.message.focus();
});

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
  open.addEventListener("click", () => select(room));
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

/** @param {string} room */
function select(room) {
  const view = rooms.get(room);
  if (!view) return;
  current = room;
  view.unread = 0;
  for (const [name, other] of rooms) {
    const button = /** @type {HTMLButtonElement} */ (other.tab.firstElementChild);
    button.setAttribute("aria-pressed", String(name === room));
    button.textContent = name;
    if (other.unread) {
      const badge = document.createElement("span");
      badge.className = "unread";
      badge.textContent = `${other.unread} new`;
      button.append(badge);
    }
  }
  ui.view.hidden = false;
  ui.messages.setAttribute("aria-label", "Messages");
  ui.messages.replaceChildren(...view.items);
  ui.earlier.hidden = !view.more;
  ui.earlier.disabled = !chat;
  scrollDown(true);
}

/** @param {string} room */
async function leaveRoom(room) {
  const view = rooms.get(room);
  if (!view) return;
  rooms.delete(room);
  view.tab.remove();
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
  if (current !== room) return;
  ui.earlier.hidden = !view.more;
  if (earlier) ui.messages.scrollTop += ui.messages.scrollHeight - height;
  else scrollDown(true);
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
  if (frame.mine) item.className = "mine";
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
  if (room === current) {
    const stick = nearBottom();
    ui.messages.insertBefore(item, ui.messages.children[at] ?? null);
    if (!quiet) scrollDown(stick || Boolean(frame.mine));
  } else if (!quiet) {
    view.unread += 1;
    const button = /** @type {HTMLButtonElement} */ (view.tab.firstElementChild);
    button.textContent = room;
    const badge = document.createElement("span");
    badge.className = "unread";
    badge.textContent = `${view.unread} new`;
    button.append(badge);
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
