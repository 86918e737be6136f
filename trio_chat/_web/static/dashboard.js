// The operator's dashboard (SPEC §13): the admin API (/v1, bearer key from sessionStorage)
// and a live chart of this instance's /metrics. Data is shown with textContent only.

const KEY = "trio-chat.admin-key";
const SAMPLES = 60;
// every 2 s (`?refresh=<seconds>` to change it, 1 at least)
const POLL_MS = Math.max(1, Number(new URLSearchParams(location.search).get("refresh")) || 2) * 1000;
/** the rooms listed, the most populated first (`GET /v1/rooms` allows 1000) */
const ROOMS_LISTED = 100;
const SVG = "http://www.w3.org/2000/svg";
const ROOM_ID = /^[A-Za-z0-9_.:-]{1,128}$/;

/** @param {string} id */
const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));
const ui = {
  signin: /** @type {HTMLFormElement} */ ($("signin")),
  signinError: $("signin-error"),
  key: /** @type {HTMLInputElement} */ ($("key")),
  signout: $("signout"),
  panels: $("panels"),
  instances: /** @type {HTMLTableSectionElement} */ ($("instances").querySelector("tbody")),
  updated: $("updated"),
  chart: $("chart"),
  connections: $("connections"),
  sessions: $("sessions"),
  sentRate: $("sent-rate"),
  deliveredRate: $("delivered-rate"),
  rooms: /** @type {HTMLTableSectionElement} */ ($("rooms").querySelector("tbody")),
  presenceForm: /** @type {HTMLFormElement} */ ($("presence-form")),
  presenceRoom: /** @type {HTMLInputElement} */ ($("presence-room")),
  presence: /** @type {HTMLTableSectionElement} */ ($("presence").querySelector("tbody")),
  publishForm: /** @type {HTMLFormElement} */ ($("publish-form")),
  publishRoom: /** @type {HTMLInputElement} */ ($("publish-room")),
  publishText: /** @type {HTMLInputElement} */ ($("publish-text")),
  userForm: /** @type {HTMLFormElement} */ ($("user-form")),
  user: /** @type {HTMLInputElement} */ ($("user")),
  muteSeconds: /** @type {HTMLInputElement} */ ($("mute-seconds")),
  sessionsTable: $("sessions-table"),
  result: $("result"),
};

/** Thrown when /v1 answers 401: the key is wrong (or was changed). */
class Unauthorized extends Error {}

/** @type {ReturnType<typeof setTimeout> | undefined} */
let timer;
/** rooms whose presence is followed */
const watched = new Set();
/** @type {Array<{t: number, connections: number, sent: number, delivered: number}>} */
const samples = [];
/** @type {{t: number, sent: number, delivered: number} | null} */
let lastCounters = null;

// --- the key ----------------------------------------------------------------------------

/**
 * A /v1 call with the key; the JSON answer, or an Error with the server's message.
 * @param {string} method
 * @param {string} path
 * @param {any} [body]
 * @returns {Promise<any>}
 */
async function api(method, path, body) {
  const key = sessionStorage.getItem(KEY);
  if (!key) throw new Unauthorized("no admin key");
  /** @type {Record<string, string>} */
  const headers = { Authorization: `Bearer ${key}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
  });
  const answer = await response.json().catch(() => ({}));
  if (response.status === 401) throw new Unauthorized(answer.message || "unauthorized");
  if (!response.ok) {
    throw new Error(`${response.status} ${answer.error || ""}: ${answer.message || response.statusText}`);
  }
  return answer;
}

ui.signin.addEventListener("submit", async (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, ui.key.value.trim());
  ui.key.value = "";
  await start();
});

ui.signout.addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  askForKey("");
});

/** @param {string} why shown above the form, if any */
function askForKey(why) {
  clearTimeout(timer);
  ui.panels.hidden = true;
  ui.signout.hidden = true;
  ui.signin.hidden = false;
  ui.signinError.textContent = why;
  ui.signinError.hidden = !why;
  ui.key.focus();
}

async function start() {
  if (!sessionStorage.getItem(KEY)) {
    askForKey("");
    return;
  }
  try {
    await refresh();
  } catch (error) {
    failed(error);
    return;
  }
  ui.signin.hidden = true;
  ui.signinError.hidden = true;
  ui.panels.hidden = false;
  ui.signout.hidden = false;
}

/** @param {unknown} error */
function failed(error) {
  if (error instanceof Unauthorized) {
    sessionStorage.removeItem(KEY);
    askForKey("The admin key was refused (401). Enter it again.");
  } else {
    report(`Failed: ${error instanceof Error ? error.message : error}`, true);
  }
}

// --- polling ----------------------------------------------------------------------------

/** One round: instances, rooms, followed rooms, metrics; then the next one is scheduled. */
async function refresh() {
  clearTimeout(timer);
  try {
    const [instances, rooms] = await Promise.all([
      api("GET", "/v1/instances"),
      api("GET", `/v1/rooms?limit=${ROOMS_LISTED}`),
      ...[...watched].map(lookUp),
      scrape().catch(() => {}),
    ]);
    showInstances(instances.instances);
    showRooms(rooms.rooms);
    ui.updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
  } finally {
    timer = setTimeout(() => refresh().catch(failed), POLL_MS);
  }
}

/** @param {Array<Record<string, any>>} instances */
function showInstances(instances) {
  const rows = instances.map((instance) => {
    const alive = Boolean(instance.alive);
    return row([
      instance.instance_id,
      { text: alive ? "alive" : "gone", className: alive ? "alive" : "dead" },
      { text: instance.sessions ?? "–", className: "num" },
      instance.host ?? "",
      { text: instance.pid ?? "", className: "num" },
      { text: instance.port ?? "", className: "num" },
      instance.started_at ? new Date(instance.started_at).toLocaleString() : "",
    ]);
  });
  if (!rows.length) rows.push(row([{ text: "no instance registered", className: "muted" }]));
  ui.instances.replaceChildren(...rows);
}

/**
 * The rooms table, updated in place (a row keeps its focus while its room keeps its place).
 * @param {Array<{room: string, users: number}>} rooms
 */
function showRooms(rooms) {
  /** @type {Map<string, HTMLTableRowElement>} */
  const shown = new Map();
  for (const line of ui.rooms.rows) if (line.dataset.room) shown.set(line.dataset.room, line);
  const lines = rooms.map((entry) => {
    const line = shown.get(entry.room) ?? roomRow(entry.room);
    line.cells[1].textContent = String(entry.users);
    return line;
  });
  if (!lines.length) lines.push(row([{ text: "no room has members", className: "muted" }, ""]));
  const same = lines.length === ui.rooms.rows.length && lines.every((line, i) => ui.rooms.rows[i] === line);
  if (!same) ui.rooms.replaceChildren(...lines);
}

/** @param {string} room */
function roomRow(room) {
  // the room's name follows its presence below
  const follow = document.createElement("button");
  follow.type = "button";
  follow.className = "link";
  follow.textContent = room;
  follow.title = `Follow the presence of ${room}`;
  follow.addEventListener("click", () => followRoom(room));
  const line = row([follow, { text: "", className: "num" }]);
  line.dataset.room = room;
  return line;
}

/** @param {string} room */
async function lookUp(room) {
  const answer = await api("GET", `/v1/rooms/${encodeURIComponent(room)}/presence`);
  const stop = document.createElement("button");
  stop.type = "button";
  stop.className = "secondary";
  stop.textContent = "×";
  stop.setAttribute("aria-label", `Stop following ${room}`);
  stop.addEventListener("click", () => {
    watched.delete(room);
    line.remove();
  });
  const line = row([
    room,
    { text: String(answer.sessions.length), className: "num" },
    answer.users.join(", ") || "nobody",
    stop,
  ]);
  line.dataset.room = room;
  const old = [...ui.presence.children].find((other) => other instanceof HTMLElement && other.dataset.room === room);
  if (old) old.replaceWith(line);
  else ui.presence.append(line);
}

ui.presenceForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const room = ui.presenceRoom.value.trim();
  if (!ROOM_ID.test(room)) return report("A room name is 1-128 letters, digits or _ . : -", true);
  await followRoom(room);
});

/** Show the presence of `room` and keep it up to date. @param {string} room */
async function followRoom(room) {
  try {
    await lookUp(room);
    watched.add(room);
    report(`Following the presence of ${room}.`);
  } catch (error) {
    failed(error);
  }
}

// --- metrics and the chart --------------------------------------------------------------

/**
 * Prometheus text: `name{labels} value` lines, by `name{labels}` as written.
 * @param {string} text
 * @returns {Map<string, number>}
 */
function parseMetrics(text) {
  const values = new Map();
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = /^([a-zA-Z_:][\w:]*(?:\{.*\})?)\s+(\S+)/.exec(line);
    if (match) values.set(match[1].replace(/\s+/g, ""), Number(match[2]));
  }
  return values;
}

async function scrape() {
  const response = await fetch("/metrics", { cache: "no-store" });
  if (!response.ok) throw new Error(`/metrics: ${response.status}`);
  const metrics = parseMetrics(await response.text());
  const now = Date.now() / 1000;
  const connections = metrics.get("trio_chat_connections") ?? 0;
  const sent = metrics.get('trio_chat_frames_in_total{type="send"}') ?? 0;
  const delivered = metrics.get("trio_chat_fanout_deliveries_total") ?? 0;
  let sentRate = 0;
  let deliveredRate = 0;
  if (lastCounters && now > lastCounters.t) {
    const seconds = now - lastCounters.t;
    // a counter that went down is an instance that restarted: count from zero
    sentRate = (sent >= lastCounters.sent ? sent - lastCounters.sent : sent) / seconds;
    deliveredRate =
      (delivered >= lastCounters.delivered ? delivered - lastCounters.delivered : delivered) / seconds;
  }
  lastCounters = { t: now, sent, delivered };
  samples.push({ t: now, connections, sent: sentRate, delivered: deliveredRate });
  if (samples.length > SAMPLES) samples.shift();
  ui.connections.textContent = String(connections);
  ui.sessions.textContent = String(metrics.get("trio_chat_sessions") ?? "–");
  ui.sentRate.textContent = sentRate.toFixed(1);
  ui.deliveredRate.textContent = deliveredRate.toFixed(1);
  draw();
}

/**
 * @param {string} name
 * @param {Record<string, string | number>} attributes
 * @param {string} [text]
 */
function svg(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  if (text !== undefined) element.textContent = text;
  return element;
}

/**
 * A round top for an axis of four steps (1, 2, 2.5 or 5 times a power of ten each).
 * @param {number} value the largest value shown
 */
function ceiling(value) {
  const quarter = Math.max(value, 4) / 4;
  const power = 10 ** Math.floor(Math.log10(quarter));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= quarter) ?? quarter;
  return step * 4;
}

/** Connections (left axis) and messages/s (right axis) over the samples kept. */
function draw() {
  const [left, right, top, bottom, width] = [44, 676, 12, 176, 720];
  const maxConnections = ceiling(Math.max(...samples.map((s) => s.connections), 0));
  const maxRate = ceiling(Math.max(...samples.map((s) => Math.max(s.sent, s.delivered)), 0));
  const parts = [];
  for (let i = 0; i <= 4; i += 1) {
    const y = top + ((bottom - top) * i) / 4;
    parts.push(svg("line", { x1: left, x2: right, y1: y, y2: y, class: "grid-line" }));
    const share = 1 - i / 4;
    parts.push(svg("text", { x: left - 6, y: y + 4, "text-anchor": "end", class: "axis" }, fmt(maxConnections * share)));
    parts.push(svg("text", { x: right + 6, y: y + 4, class: "axis" }, fmt(maxRate * share)));
  }
  const span = ((SAMPLES - 1) * POLL_MS) / 1000;
  const ago = span >= 120 ? `${Math.round(span / 60)} min ago` : `${Math.round(span)} s ago`;
  parts.push(svg("text", { x: left, y: 196, class: "axis" }, ago));
  parts.push(svg("text", { x: right, y: 196, "text-anchor": "end", class: "axis" }, "now"));
  /** @param {(s: typeof samples[number]) => number} pick @param {number} max @param {string} kind */
  const line = (pick, max, kind) => {
    const points = samples.map((sample, i) => {
      const x = right - ((samples.length - 1 - i) * (right - left)) / (SAMPLES - 1);
      const y = bottom - (pick(sample) / max) * (bottom - top);
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    });
    return svg("polyline", { points: points.join(" "), class: `series ${kind}` });
  };
  parts.push(line((s) => s.connections, maxConnections, "s1"));
  parts.push(line((s) => s.sent, maxRate, "s2"));
  parts.push(line((s) => s.delivered, maxRate, "s3"));
  ui.chart.setAttribute("viewBox", `0 0 ${width} 200`);
  ui.chart.replaceChildren(...parts);
}

/** @param {number} value */
function fmt(value) {
  return Number.isInteger(value) ? String(value) : value.toFixed(1);
}

// --- actions ----------------------------------------------------------------------------

ui.publishForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const room = ui.publishRoom.value.trim();
  const text = ui.publishText.value;
  if (!ROOM_ID.test(room)) return report("A room name is 1-128 letters, digits or _ . : -", true);
  try {
    const answer = await api("POST", "/v1/publish", { room, data: { text } });
    ui.publishText.value = "";
    report(`Published to ${room} as ${answer.id}.`);
  } catch (error) {
    failed(error);
  }
});

/** @type {Record<string, (user: string, path: string) => Promise<string>>} */
const actions = {
  async sessions(user, path) {
    const { sessions } = await api("GET", `${path}/sessions`);
    showSessions(sessions);
    return `${user} has ${plural(sessions.length, "live session")}.`;
  },
  async logout(user, path) {
    const { closed } = await api("POST", `${path}/logout`);
    return `Logged out ${user}: ${plural(closed, "session")} closed.`;
  },
  async ban(user, path) {
    const { closed } = await api("POST", `${path}/ban`);
    return `Banned ${user}: ${plural(closed, "session")} closed.`;
  },
  async unban(user, path) {
    await api("POST", `${path}/unban`);
    return `Unbanned ${user}.`;
  },
  async mute(user, path) {
    const seconds = Number(ui.muteSeconds.value);
    const { muted_until: until } = await api("POST", `${path}/mute`, { seconds });
    return `Muted ${user} until ${new Date(until * 1000).toLocaleTimeString()}.`;
  },
};

/** @param {string} action */
async function act(action) {
  const user = ui.user.value.trim();
  if (!user) {
    report("Enter a user id first.", true);
    ui.user.focus();
    return;
  }
  try {
    report(await actions[action](user, `/v1/users/${encodeURIComponent(user)}`));
  } catch (error) {
    failed(error);
  }
}

ui.userForm.addEventListener("submit", (event) => {
  event.preventDefault();
  act("sessions");
});
for (const button of ui.userForm.querySelectorAll("button[data-action]")) {
  const action = /** @type {HTMLElement} */ (button).dataset.action ?? "";
  if (action !== "sessions") button.addEventListener("click", () => act(action));
}

/** @param {Array<Record<string, any>>} sessions */
function showSessions(sessions) {
  const body = /** @type {HTMLElement} */ (ui.sessionsTable.querySelector("tbody"));
  body.replaceChildren(
    ...sessions.map((s) =>
      row([s.session_id, s.instance, (s.rooms ?? []).join(", "), new Date(s.connected_at).toLocaleString()]),
    ),
  );
  ui.sessionsTable.hidden = sessions.length === 0;
}

// --- little things ----------------------------------------------------------------------

/**
 * A table row of text cells (or given elements).
 * @param {Array<string | number | Node | {text: string | number, className?: string}>} cells
 */
function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.append(cell);
    else if (typeof cell === "object") {
      td.textContent = String(cell.text);
      if (cell.className) td.className = cell.className;
    } else td.textContent = String(cell);
    tr.append(td);
  }
  return tr;
}

/**
 * @param {number} count
 * @param {string} noun
 */
function plural(count, noun) {
  return `${count} ${noun}${count === 1 ? "" : "s"}`;
}

/**
 * @param {string} text
 * @param {boolean} [error]
 */
function report(text, error = false) {
  ui.result.textContent = text;
  ui.result.classList.toggle("error", error);
}

start();
