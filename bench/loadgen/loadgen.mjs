// Load generator for bench/run.py: one Node process holds every client connection, so the
// publisher's timestamp and every subscriber's arrival time come from one clock
// (performance.now()). Prints one JSON object on stdout; progress goes to stderr.
//
//   node loadgen.mjs --system trio|socketio --urls URL1,URL2 --secret S --workload W [options]
//
// Workloads (each spreads its clients over the two instances alternately):
//   fanout  1 room per rate step, --subscribers clients, 1 publisher on instance 1 sending at
//           each of --rates msg/s for --duration s, then up to --drain s to let deliveries in.
//           Fresh connections (and a fresh room) per rate step.
//   rooms   --rooms rooms x --members members, each member sends --member-rate msg/s for
//           --duration s (staggered evenly); every message goes to the other members. With
//           --rooms-traffic both (trio only, SPEC §15) each member also sends a `signal`
//           (typing) half its interval before each message, and a `read` (the message's id)
//           for each message it receives; the other members' `signal` and `read` frames are
//           counted. `signals` or `reads`: only that half.
//   idle    --connections clients, opened --concurrency at a time, each joins its own room;
//           server RSS before/after from /proc/<pid>/status.
//   connect --connections clients, --concurrency at a time, each opened and then joined to a
//           room of its own before its slot takes the next one: connections opened and joined
//           per second (run.py gives it one instance's URL twice).
// Server CPU: utime+stime from /proc/<pid>/stat of --pids (and --redis-pid: one pid, or a
// comma-separated list for a Redis Cluster's nodes, summed in redis_cpu and each in
// redis_cpu_each) around each measured window. No client ever connects anywhere but the --urls
// given (127.0.0.1).

import { createHmac, randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { monitorEventLoopDelay, performance } from "node:perf_hooks";
import { setTimeout as sleep } from "node:timers/promises";

import WebSocket from "ws";
import { io } from "socket.io-client";

// --- arguments ------------------------------------------------------------------------------

function parseArgs(argv) {
  const args = {
    system: "trio",
    urls: "",
    secret: "",
    workload: "fanout",
    rates: "50,100,200,400,800,1600",
    duration: 10,
    drain: 2,
    subscribers: 400,
    rooms: 500,
    members: 4,
    memberRate: 1,
    roomsTraffic: "", // "", signals, reads or both
    idleSample: 0, // rooms: seconds of the servers' idle CPU read just before the window
    connections: 5000,
    concurrency: 200,
    settle: 2,
    warmup: 50,
    pids: "",
    redisPid: "",
    connectTimeout: 30,
    maxSeconds: 600,
    payload: 0,
    late: 3,
    quietMax: 60,
    quietOther: 0.25,
    quietServer: 0.2,
    retries: 1,
    disturbedOther: 0.4,
  };
  for (let i = 2; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, "").replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    if (!(key in args)) throw new Error(`unknown option ${argv[i]}`);
    const value = argv[i + 1];
    if (value === undefined) throw new Error(`${argv[i]} needs a value`);
    args[key] = typeof args[key] === "number" ? Number(value) : value;
  }
  if (!args.urls || !args.secret) throw new Error("--urls and --secret are required");
  args.urls = args.urls.split(",");
  args.rates = String(args.rates).split(",").map(Number);
  args.pids = args.pids ? args.pids.split(",").map(Number) : [];
  args.redisPid = args.redisPid ? String(args.redisPid).split(",").map(Number) : [];
  return args;
}

const log = (...parts) => process.stderr.write(`[loadgen] ${parts.join(" ")}\n`);

// --- JWT (HS256, sub/iat/exp) ---------------------------------------------------------------

const b64url = (buf) => Buffer.from(buf).toString("base64url");
function mintToken(secret, sub) {
  const now = Math.floor(Date.now() / 1000);
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify({ sub, iat: now, exp: now + 3600 }));
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

// --- /proc ----------------------------------------------------------------------------------

const CLK_TCK = 100; // sysconf(_SC_CLK_TCK) on Linux x86_64/aarch64

function cpuSeconds(pid) {
  // Fields after the ")" of the command name: state is field 3; utime, stime are 14 and 15.
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) / CLK_TCK;
}

function rssKiB(pid) {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const match = status.match(/^VmRSS:\s+(\d+) kB/m);
  return match ? Number(match[1]) : NaN;
}

function machineTicks() {
  // First line of /proc/stat: busy = everything but idle and iowait, in ticks, all CPUs.
  const line = readFileSync("/proc/stat", "utf8").split("\n", 1)[0];
  const ticks = line.trim().split(/\s+/).slice(1).map(Number);
  const total = ticks.reduce((a, b) => a + b, 0);
  return { busy: total - ticks[3] - ticks[4], total };
}

const loopDelay = monitorEventLoopDelay({ resolution: 1 });
loopDelay.enable();

class CpuWindow {
  constructor(pids, redisPid) {
    this.pids = pids;
    this.redisPid = redisPid;
    this.machine0 = machineTicks();
    loopDelay.reset();
    this.t0 = performance.now();
    this.servers0 = pids.map(cpuSeconds);
    this.redis0 = redisPid.map(cpuSeconds);
    this.self0 = process.cpuUsage();
  }
  finish() {
    const wall = (performance.now() - this.t0) / 1000;
    const servers = this.pids.map((pid, i) => (cpuSeconds(pid) - this.servers0[i]) / wall);
    const self = process.cpuUsage(this.self0);
    const machine = machineTicks();
    const busyCores = ((machine.busy - this.machine0.busy) / CLK_TCK) / wall;
    const redis = this.redisPid.map((pid, i) => (cpuSeconds(pid) - this.redis0[i]) / wall);
    const redisTotal = redis.reduce((a, b) => a + b, 0);
    const ours = servers.reduce((a, b) => a + b, 0) + (self.user + self.system) / 1e6 / wall +
      redisTotal;
    return {
      wall_s: round(wall, 3),
      server_cpu: round(servers.reduce((a, b) => a + b, 0), 3),
      server_cpu_each: servers.map((v) => round(v, 3)),
      redis_cpu: this.redisPid.length ? round(redisTotal, 3) : null,
      redis_cpu_each: redis.map((v) => round(v, 4)),
      loadgen_cpu: round((self.user + self.system) / 1e6 / wall, 3),
      // CPU used by everything else on the machine meanwhile (a shared machine)
      other_cpu: round(busyCores - ours, 3),
      loadgen_loop_delay_p99_ms: round(loopDelay.percentile(99) / 1e6, 2),
      loadgen_loop_delay_max_ms: round(loopDelay.max / 1e6, 2),
    };
  }
}

// --- statistics -----------------------------------------------------------------------------

function round(value, digits) {
  if (!Number.isFinite(value)) return null;
  const f = 10 ** digits;
  return Math.round(value * f) / f;
}

class Samples {
  constructor(capacity) {
    this.values = new Float64Array(Math.max(16, capacity));
    this.n = 0;
  }
  add(v) {
    if (this.n === this.values.length) {
      const bigger = new Float64Array(this.values.length * 2);
      bigger.set(this.values);
      this.values = bigger;
    }
    this.values[this.n++] = v;
  }
  summary() {
    if (this.n === 0) return { n: 0, p50_ms: null, p99_ms: null, max_ms: null };
    const sorted = this.values.subarray(0, this.n).sort();
    const rank = (q) => sorted[Math.max(0, Math.ceil(q * this.n) - 1)];
    return {
      n: this.n,
      p50_ms: round(rank(0.5), 2),
      p90_ms: round(rank(0.9), 2),
      p99_ms: round(rank(0.99), 2),
      max_ms: round(sorted[this.n - 1], 2),
    };
  }
}

/** Latency by the second of sending it happened in: where in the step the delays were. */
class Timeline {
  constructor(seconds) {
    this.buckets = Array.from({ length: Math.ceil(seconds) + 1 }, () => new Samples(16));
    this.start = 0;
  }
  add(sentAt, latency) {
    const i = Math.min(this.buckets.length - 1, Math.max(0, Math.floor((sentAt - this.start) / 1000)));
    this.buckets[i].add(latency);
  }
  summary() {
    return this.buckets.map((b, i) => {
      const s = b.summary();
      return [i, s.n, s.p50_ms, s.p99_ms, s.max_ms];
    });
  }
}

// --- clients --------------------------------------------------------------------------------
// Common shape: connect() resolves once the server has accepted the session (trio-chat:
// `welcome` read; socket.io: `connect` event, i.e. after the server's connect handler ran);
// join(room) resolves on `joined` / the join ack; send(room, data) counts its ack;
// onMessage(data) gets every room message's data; closed = {code, reason} if the server or
// the network ended the connection before we closed it.

class Stats {
  constructor() {
    this.acks = 0;
    this.events = {}; // room events that are not messages (signal, read, presence_*)
    this.errors = {};
    this.closes = {};
  }
  error(code) {
    this.errors[code] = (this.errors[code] || 0) + 1;
  }
  event(type) {
    this.events[type] = (this.events[type] || 0) + 1;
  }
  close(code) {
    this.closes[code] = (this.closes[code] || 0) + 1;
  }
}

class TrioClient {
  constructor(url, token, stats, timeoutMs) {
    this.stats = stats;
    this.onMessage = null;
    this.onSignal = null;
    this.onRead = null;
    this.refs = 0;
    this.pending = new Map();
    this.closing = false;
    this.opened = false;
    this.ws = new WebSocket(url, {
      perMessageDeflate: false,
      headers: { Authorization: `Bearer ${token}` },
      handshakeTimeout: timeoutMs,
    });
    this.ready = new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("welcome timeout")), timeoutMs);
      this.ws.on("unexpected-response", (req, res) => {
        let body = "";
        res.on("data", (chunk) => (body += chunk));
        res.on("end", () => {
          clearTimeout(timer);
          reject(new Error(`HTTP ${res.statusCode} ${body.slice(0, 200)}`));
        });
      });
      this.ws.on("error", (err) => {
        clearTimeout(timer);
        reject(err);
      });
      this.ws.on("message", (raw) => {
        const frame = JSON.parse(raw.toString());
        switch (frame.type) {
          case "message":
            if (this.onMessage) this.onMessage(frame.data, frame);
            break;
          case "ack":
            this.stats.acks++;
            break;
          case "signal":
            this.stats.event(frame.type);
            if (this.onSignal) this.onSignal(frame);
            break;
          case "read":
            this.stats.event(frame.type);
            if (this.onRead) this.onRead(frame);
            break;
          case "presence_join":
          case "presence_leave":
            this.stats.event(frame.type);
            break;
          case "welcome":
            clearTimeout(timer);
            this.opened = true;
            resolve(this);
            break;
          case "joined": {
            const done = this.pending.get(frame.ref);
            this.pending.delete(frame.ref);
            if (done) done.resolve(frame);
            break;
          }
          case "error": {
            this.stats.error(frame.code);
            const done = this.pending.get(frame.ref);
            this.pending.delete(frame.ref);
            if (done) done.reject(new Error(`error ${frame.code}: ${frame.message}`));
            break;
          }
          default:
            this.stats.error(`frame:${frame.type}`);
        }
      });
      this.ws.on("close", (code) => {
        clearTimeout(timer);
        // Closes of sessions that were never welcomed are connect failures, counted there.
        if (this.opened && !this.closing) this.stats.close(code);
        for (const done of this.pending.values()) done.reject(new Error(`closed ${code}`));
        this.pending.clear();
        reject(new Error(`closed ${code} before welcome`));
      });
    });
  }
  join(room) {
    const ref = ++this.refs;
    return new Promise((resolve, reject) => {
      this.pending.set(ref, { resolve, reject });
      this.ws.send(JSON.stringify({ type: "join", room, ref }));
    });
  }
  send(room, data) {
    if (this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify({ type: "send", room, data }));
    }
  }
  // SPEC §15: neither has a reply on success (an `error` frame if refused)
  signal(room, data) {
    if (this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify({ type: "signal", room, data }));
    }
  }
  read(room, id) {
    if (this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify({ type: "read", room, id }));
    }
  }
  close() {
    this.closing = true;
    return new Promise((resolve) => {
      if (this.ws.readyState === WebSocket.CLOSED) return resolve();
      const timer = setTimeout(() => {
        this.ws.terminate();
        resolve();
      }, 5000);
      this.ws.once("close", () => {
        clearTimeout(timer);
        resolve();
      });
      this.ws.close(1000);
    });
  }
}

class SocketIoClient {
  constructor(url, token, stats, timeoutMs) {
    this.stats = stats;
    this.onMessage = null;
    this.closing = false;
    this.socket = io(url, {
      transports: ["websocket"], // no long-polling upgrade dance
      auth: { token },
      forceNew: true, // one connection per client, no multiplexing
      reconnection: false,
      perMessageDeflate: false,
      timeout: timeoutMs,
    });
    this.socket.on("message", (message) => {
      if (this.onMessage) this.onMessage(message.data);
    });
    this.ready = new Promise((resolve, reject) => {
      this.socket.once("connect", () => resolve(this));
      this.socket.once("connect_error", (err) => reject(new Error(`connect_error ${err.message}`)));
    });
    this.socket.on("disconnect", (reason) => {
      if (!this.closing) this.stats.close(reason);
    });
  }
  join(room) {
    return this.socket.timeout(30000).emitWithAck("join", { room }).then((reply) => {
      if (!reply || reply.type !== "joined") throw new Error(`join: ${JSON.stringify(reply)}`);
      return reply;
    });
  }
  send(room, data) {
    if (!this.socket.connected) return;
    this.socket.emit("send", { room, data }, (reply) => {
      if (reply && reply.type === "ack") this.stats.acks++;
      else this.stats.error(reply && reply.code ? reply.code : "bad_ack");
    });
  }
  close() {
    this.closing = true;
    this.socket.disconnect();
    return Promise.resolve();
  }
}

// --- helpers --------------------------------------------------------------------------------

function makeClient(args, url, user, stats) {
  const token = mintToken(args.secret, user);
  const Client = args.system === "trio" ? TrioClient : SocketIoClient;
  return new Client(url, token, stats, args.connectTimeout * 1000);
}

/** Run fn(i) for i in [0, n) with at most `limit` in flight; collect failures by message. */
async function pool(n, limit, fn) {
  const failures = {};
  let next = 0;
  async function worker() {
    while (next < n) {
      const i = next++;
      try {
        await fn(i);
      } catch (err) {
        const key = String(err && err.message ? err.message : err).slice(0, 120);
        failures[key] = (failures[key] || 0) + 1;
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, n) }, worker));
  return failures;
}

/** Open clients[i] = a connected client (or null on failure) for i in [0, n). */
async function openClients(args, n, userOf, urlOf, stats, roomOf = null, joinMs = null) {
  const clients = new Array(n).fill(null);
  const openMs = new Samples(n);
  const failures = await pool(n, args.concurrency, async (i) => {
    const started = performance.now();
    const client = makeClient(args, urlOf(i), userOf(i), stats);
    clients[i] = client;
    try {
      await client.ready;
    } catch (err) {
      clients[i] = null;
      client.close().catch(() => {});
      throw err;
    }
    openMs.add(performance.now() - started);
    if (!roomOf) return;
    const joinStarted = performance.now();
    await client.join(roomOf(i));
    if (joinMs) joinMs.add(performance.now() - joinStarted);
  });
  return { clients, failures, openMs };
}

async function closeAll(clients) {
  await Promise.all(clients.filter(Boolean).map((c) => c.close().catch(() => {})));
}

function publisherLoop(total, ratePerSecond, sendOne) {
  // Sends message k at (or as soon as possible after) start + k / rate; returns the wall
  // time of the first and last send and the worst lag behind the schedule.
  return new Promise((resolve) => {
    const start = performance.now();
    let sent = 0;
    let maxLag = 0;
    let last = start;
    const tick = () => {
      const now = performance.now();
      const due = Math.min(total, Math.floor(((now - start) * ratePerSecond) / 1000) + 1);
      if (due > sent) maxLag = Math.max(maxLag, now - (start + (sent * 1000) / ratePerSecond));
      while (sent < due) {
        sendOne(sent);
        sent++;
      }
      last = now;
      if (sent < total) setTimeout(tick, 1);
      else resolve({ start, last, maxLagMs: maxLag });
    };
    tick();
  });
}

/** Before a measured window: wait (at most --quiet-max s) until the servers are idle (no
 * backlog from the previous step) and the rest of the machine uses < --quiet-other cores. */
async function waitQuiet(args) {
  const t0 = performance.now();
  let last = null;
  while (args.quietMax > 0) {
    const window = new CpuWindow(args.pids, args.redisPid);
    await sleep(700);
    last = window.finish();
    const waited = round((performance.now() - t0) / 1000, 1);
    if (last.other_cpu < args.quietOther && last.server_cpu < args.quietServer) {
      return { quiet: true, waited_s: waited };
    }
    if (waited >= 3 && Math.round(waited / 0.7) % 5 === 0) {
      log(`  waiting for quiet: other processes ${last.other_cpu}, servers ${last.server_cpu} cores`);
    }
    if (waited > args.quietMax) {
      log(`  machine not quiet after ${waited} s: other ${last.other_cpu}, servers ${last.server_cpu}`);
      return { quiet: false, waited_s: waited, other_cpu: last.other_cpu, server_cpu: last.server_cpu };
    }
  }
  return { quiet: null, waited_s: 0 };
}

async function waitFor(predicate, timeoutMs) {
  const deadline = performance.now() + timeoutMs;
  while (!predicate() && performance.now() < deadline) await sleep(5);
  return predicate();
}

// --- workload A: fan-out --------------------------------------------------------------------

/** Was the measured window disturbed by other processes on the (shared) machine? */
function disturbed(args, window) {
  return args.retries > 0 && window && window.other_cpu > args.disturbedOther;
}

async function fanout(args) {
  const steps = [];
  for (const [stepIndex, rate] of args.rates.entries()) {
    const disturbedAttempts = [];
    for (let attempt = 0; ; attempt++) {
      const step = await fanoutStep(args, stepIndex * 100 + attempt, rate);
      if (attempt < args.retries && disturbed(args, step)) {
        log(`  other processes used ${step.other_cpu} cores meanwhile: measuring ${rate}/s again`);
        disturbedAttempts.push(summaryOfAttempt(step));
        continue;
      }
      step.disturbed_attempts = disturbedAttempts;
      steps.push(step);
      break;
    }
  }
  return { workload: "fanout", steps };
}

function summaryOfAttempt(step) {
  const keys = ["other_cpu", "server_cpu", "lost", "p50_ms", "p99_ms", "max_ms"];
  return Object.fromEntries(keys.map((k) => [k, step[k]]));
}

async function fanoutStep(args, tag, rate) {
  const stats = new Stats();
  const room = `fanout-${tag}-${randomBytes(3).toString("hex")}`;
  const n = args.subscribers;
  const total = Math.round(rate * args.duration);
  const expected = total * n;
  const latency = new Samples(Math.min(expected, 20_000_000));
  const timeline = new Timeline(args.duration);
  let received = 0;
  let stale = 0;
  let reordered = 0;
  let lastArrival = 0;
  log(`fanout ${args.system}: ${rate} msg/s x ${args.duration} s to ${n} subscribers`);
  const subs = await openClients(
    args, n, (i) => `sub-${tag}-${i}`, (i) => args.urls[i % 2], stats, () => room,
  );
  const pub = await openClients(args, 1, () => `pub-${tag}`, () => args.urls[0], stats,
    () => room);
  const failures = { ...subs.failures };
  for (const [key, count] of Object.entries(pub.failures)) {
    failures[key] = (failures[key] || 0) + count;
  }
  for (const client of subs.clients) {
    if (!client) continue;
    let lastSeq = -1;
    client.onMessage = (data) => {
      const now = performance.now();
      if (!data || data.s !== tag) {
        stale++;
        return;
      }
      received++;
      lastArrival = now;
      latency.add(now - data.t);
      timeline.add(data.t, now - data.t);
      if (data.n <= lastSeq) reordered++;
      lastSeq = data.n;
    };
  }
  const connected = subs.clients.filter(Boolean).length;
  const publisher = pub.clients[0];
  let step;
  if (publisher) {
    const quiet = await waitQuiet(args);
    log(`  SENDING rate=${rate}`);
    const cpu = new CpuWindow(args.pids, args.redisPid);
    timeline.start = performance.now();
    const pad = args.payload > 0 ? "x".repeat(args.payload) : undefined;
    const sending = await publisherLoop(total, rate, (k) => {
      publisher.send(room, { s: tag, n: k, t: performance.now(), pad });
    });
    await waitFor(() => received >= expected, args.drain * 1000);
    const window = cpu.finish();
    const receivedAtDrain = received;
    const closesAtDrain = { ...stats.closes };
    const latencyAtDrain = latency.summary(); // messages later than the drain count as lost
    const lastArrivalAtDrain = lastArrival;
    await waitFor(() => received >= expected, args.late * 1000);
    await waitFor(() => stats.acks >= total, 1000);
    const sendSeconds = (sending.last - sending.start) / 1000;
    const spanSeconds = ((lastArrivalAtDrain || sending.last) - sending.start) / 1000;
    step = {
      rate,
      duration_s: args.duration,
      subscribers: n,
      connected,
      sent: total,
      acks: stats.acks,
      achieved_send_rate: round(total / Math.max(sendSeconds, 1e-9), 1),
      publisher_max_lag_ms: round(sending.maxLagMs, 2),
      expected,
      received: receivedAtDrain,
      lost: expected - receivedAtDrain,
      loss_pct: round((100 * (expected - receivedAtDrain)) / expected, 3),
      arrived_late: received - receivedAtDrain,
      missing_after_late: expected - received,
      late_window_s: args.late,
      stale,
      reordered,
      delivered_per_s: round(receivedAtDrain / Math.max(spanSeconds, 1e-9), 0),
      ...latencyAtDrain,
      ...window,
      errors: stats.errors,
      closes: closesAtDrain,
      closes_after_drain: stats.closes,
      quiet,
      connect_failures: failures,
      timeline_by_send_second: timeline.summary(), // [second, n, p50, p99, max]
    };
  } else {
    step = { rate, connected, error: "publisher could not connect", connect_failures: failures };
  }
  log(
    `  delivered ${step.received}/${step.expected} p50 ${step.p50_ms} p99 ${step.p99_ms} ` +
      `max ${step.max_ms} ms, servers ${step.server_cpu} other ${step.other_cpu} cores, ` +
      `closes ${JSON.stringify(stats.closes)}`,
  );
  await closeAll([...subs.clients, publisher]);
  await sleep(500);
  return step;
}

// --- workload B: many rooms -----------------------------------------------------------------

async function rooms(args) {
  const stats = new Stats();
  const n = args.rooms * args.members;
  const roomOf = (i) => `room-${Math.floor(i / args.members)}`;
  if (!["", "signals", "reads", "both"].includes(args.roomsTraffic)) {
    throw new Error(`--rooms-traffic: signals, reads or both, not ${args.roomsTraffic}`);
  }
  if (args.roomsTraffic && args.system !== "trio") {
    throw new Error("--rooms-traffic: trio-chat only (signal and read frames)");
  }
  log(`rooms ${args.system}: ${args.rooms} rooms x ${args.members} members` +
    (args.roomsTraffic ? `, rooms traffic: ${args.roomsTraffic}` : ""));
  const started = performance.now();
  const opened = await openClients(args, n, (i) => `m-${i}`, (i) => args.urls[i % 2], stats,
    roomOf);
  const openSeconds = (performance.now() - started) / 1000;
  const connected = opened.clients.filter(Boolean).length;
  const disturbedAttempts = [];
  let result;
  for (let attempt = 0; ; attempt++) {
    result = await roomsAttempt(args, attempt, opened.clients, roomOf, stats);
    if (attempt < args.retries && disturbed(args, result)) {
      log(`  other processes used ${result.other_cpu} cores meanwhile: measuring again`);
      disturbedAttempts.push(summaryOfAttempt(result));
      continue;
    }
    break;
  }
  await closeAll(opened.clients);
  return {
    workload: "rooms",
    rooms: args.rooms,
    members: args.members,
    member_rate: args.memberRate,
    rooms_traffic: args.roomsTraffic || null,
    duration_s: args.duration,
    connected,
    open_s: round(openSeconds, 2),
    ...result,
    errors: stats.errors,
    events: stats.events,
    closes_after_drain: stats.closes,
    connect_failures: opened.failures,
    disturbed_attempts: disturbedAttempts,
  };
}

async function roomsAttempt(args, attempt, clients, roomOf, stats) {
  const n = clients.length;
  const total = Math.round(n * args.memberRate * args.duration);
  const expected = total * (args.members - 1);
  const latency = new Samples(expected);
  const timeline = new Timeline(args.duration);
  const acks0 = stats.acks;
  const signals = args.roomsTraffic === "signals" || args.roomsTraffic === "both";
  const reads = args.roomsTraffic === "reads" || args.roomsTraffic === "both";
  const traffic = signals || reads;
  const signalLatency = new Samples(signals ? expected : 0);
  // --rooms-traffic: counted from the start of the measured window (reads carry no attempt)
  let signalsSent = 0;
  let signalsReceived = 0;
  let readsSent = 0;
  let readsReceived = 0;
  let lastRead = 0;
  let received = 0;
  let stale = 0;
  let lastArrival = 0;
  for (const [i, client] of clients.entries()) {
    if (!client) continue;
    client.onMessage = (data, frame) => {
      const now = performance.now();
      if (!data || data.a !== attempt) {
        stale++;
        return;
      }
      received++;
      lastArrival = now;
      latency.add(now - data.t);
      timeline.add(data.t, now - data.t);
      if (reads) {
        client.read(roomOf(i), frame.id); // read as soon as it is shown
        readsSent++;
      }
    };
    client.onSignal = (frame) => {
      if (!frame.data || frame.data.a !== attempt) return;
      signalsReceived++;
      signalLatency.add(performance.now() - frame.data.t);
    };
    client.onRead = () => {
      readsReceived++;
      lastRead = performance.now();
    };
  }
  const quiet = await waitQuiet(args);
  let idle = null;
  if (args.idleSample > 0) {
    const idleWindow = new CpuWindow(args.pids, args.redisPid);
    await sleep(args.idleSample * 1000);
    idle = idleWindow.finish();
  }
  log(`  SENDING ${total} messages over ${args.duration} s`);
  const cpu = new CpuWindow(args.pids, args.redisPid);
  timeline.start = performance.now();
  readsReceived = 0;
  // Global index m -> member m % n, so each member sends every 1/memberRate s, staggered.
  // With signals, the same slot also has member (m + n/2) % n signal (typing): each member
  // signals half its interval before each of its messages (the first half-interval's
  // signals precede the members' second messages, and the last half-interval's come after
  // their last: as many signals as messages, in the same window as plain B's).
  const lead = Math.floor(n / 2);
  const sending = await publisherLoop(total, n * args.memberRate, (m) => {
    const client = clients[m % n];
    if (client) client.send(roomOf(m % n), { a: attempt, n: m, t: performance.now() });
    const typist = signals ? clients[(m + lead) % n] : null;
    if (typist) {
      typist.signal(roomOf((m + lead) % n), { a: attempt, typing: true, t: performance.now() });
      signalsSent++;
    }
  });
  // The signals and read markers of the window are part of its work: wait for them too. A
  // read waiting in the server's outbox behind another of its room is merged into it (only
  // the newest moves the marker), so fewer than reads_expected may come: those are done
  // once none has come for 300 ms.
  const done = () => received >= expected &&
    (!traffic || (signalsReceived >= signalsSent * (args.members - 1) &&
      (readsReceived >= readsSent * (args.members - 1) ||
        performance.now() - lastRead > 300)));
  await waitFor(done, args.drain * 1000);
  const window = cpu.finish();
  const trafficAtDrain = traffic
    ? {
      signals_sent: signalsSent,
      signals_expected: signalsSent * (args.members - 1),
      signals_received: signalsReceived,
      signal_latency: signalLatency.summary(),
      reads_sent: readsSent,
      reads_expected: readsSent * (args.members - 1),
      reads_received: readsReceived,
    }
    : {};
  const receivedAtDrain = received;
  const latencyAtDrain = latency.summary();
  const lastArrivalAtDrain = lastArrival;
  const closesAtDrain = { ...stats.closes };
  await waitFor(done, args.late * 1000);
  await waitFor(() => stats.acks - acks0 >= total, 1000);
  if (traffic) {
    trafficAtDrain.signals_received_after_late = signalsReceived;
    trafficAtDrain.reads_received_after_late = readsReceived;
  }
  const sendSeconds = (sending.last - sending.start) / 1000;
  const step = {
    sent: total,
    acks: stats.acks - acks0,
    achieved_send_rate: round(total / Math.max(sendSeconds, 1e-9), 1),
    publisher_max_lag_ms: round(sending.maxLagMs, 2),
    expected,
    received: receivedAtDrain,
    lost: expected - receivedAtDrain,
    arrived_late: received - receivedAtDrain,
    missing_after_late: expected - received,
    late_window_s: args.late,
    stale,
    delivered_per_s: round(
      receivedAtDrain / Math.max(((lastArrivalAtDrain || sending.last) - sending.start) / 1000, 1e-9),
      0,
    ),
    ...latencyAtDrain,
    ...window,
    ...trafficAtDrain,
    // the servers connected and joined, before anything is sent (heartbeats, timers)
    idle_server_cpu: idle ? idle.server_cpu : null,
    idle_other_cpu: idle ? idle.other_cpu : null,
    closes: closesAtDrain,
    quiet,
    timeline_by_send_second: timeline.summary(),
  };
  log(
    `  delivered ${step.received}/${step.expected} p50 ${step.p50_ms} p99 ${step.p99_ms} ` +
      `max ${step.max_ms} ms, servers ${step.server_cpu} other ${step.other_cpu} cores`,
  );
  if (traffic) {
    log(`  signals ${step.signals_received}/${step.signals_expected}, reads ` +
      `${step.reads_received}/${step.reads_expected}`);
  }
  return step;
}

// --- workload C: idle connections -----------------------------------------------------------

async function idle(args) {
  const stats = new Stats();
  const n = args.connections;
  log(`idle ${args.system}: warm-up ${args.warmup} connections`);
  const warm = await openClients(args, args.warmup, (i) => `warm-${i}`, (i) => args.urls[i % 2],
    stats, (i) => `warm-${i}`);
  await closeAll(warm.clients);
  await sleep(args.settle * 1000);
  const quiet = await waitQuiet(args);
  const before = args.pids.map(rssKiB);
  log(`idle ${args.system}: opening ${n} connections, ${args.concurrency} in flight`);
  const cpu = new CpuWindow(args.pids, args.redisPid);
  const t0 = performance.now();
  const opened = await openClients(args, n, (i) => `idle-${i}`, (i) => args.urls[i % 2], stats);
  const t1 = performance.now();
  const openWindow = cpu.finish();
  const clients = opened.clients;
  const connected = clients.filter(Boolean).length;
  const joinFailures = await pool(n, args.concurrency, async (i) => {
    if (clients[i]) await clients[i].join(`idle-${i}`);
  });
  const t2 = performance.now();
  await sleep(args.settle * 1000);
  const after = args.pids.map(rssKiB);
  const stillOpen = connected - Object.values(stats.closes).reduce((a, b) => a + b, 0);
  await closeAll(clients);
  const delta = after.reduce((a, b) => a + b, 0) - before.reduce((a, b) => a + b, 0);
  return {
    workload: "idle",
    connections: n,
    concurrency: args.concurrency,
    connected,
    still_open: stillOpen,
    open_s: round((t1 - t0) / 1000, 3),
    opened_per_s: round(connected / ((t1 - t0) / 1000), 1),
    open_latency: opened.openMs.summary(),
    join_s: round((t2 - t1) / 1000, 3),
    joins_per_s: round(connected / ((t2 - t1) / 1000), 1),
    open_server_cpu: openWindow.server_cpu,
    open_redis_cpu: openWindow.redis_cpu,
    open_loadgen_cpu: openWindow.loadgen_cpu,
    open_other_cpu: openWindow.other_cpu,
    quiet,
    rss_before_kib: before,
    rss_after_kib: after,
    kib_per_connection: round(delta / Math.max(connected, 1), 2),
    errors: stats.errors,
    closes: stats.closes,
    connect_failures: opened.failures,
    join_failures: joinFailures,
  };
}

// --- workload D: connection rate (open, then join a new room) ------------------------------

async function connect(args) {
  const stats = new Stats();
  const n = args.connections;
  log(`connect ${args.system}: warm-up ${args.warmup} connections`);
  const warm = await openClients(args, args.warmup, (i) => `cw-${i}`, (i) => args.urls[i % 2],
    stats, (i) => `cw-${i}`);
  await closeAll(warm.clients);
  await sleep(args.settle * 1000);
  const quiet = await waitQuiet(args);
  log(`connect ${args.system}: ${n} connections opened and joined, ${args.concurrency} in flight`);
  const cpu = new CpuWindow(args.pids, args.redisPid);
  const joinMs = new Samples(n);
  const t0 = performance.now();
  const opened = await openClients(args, n, (i) => `conn-${i}`, (i) => args.urls[i % 2], stats,
    (i) => `conn-${i}`, joinMs);
  const t1 = performance.now();
  const window = cpu.finish();
  log(`connect ${args.system}: all opened and joined`);
  const connected = opened.clients.filter(Boolean).length;
  const joined = joinMs.n;
  await closeAll(opened.clients);
  return {
    workload: "connect",
    connections: n,
    concurrency: args.concurrency,
    connected,
    joined,
    total_s: round((t1 - t0) / 1000, 3),
    opened_joined_per_s: round(joined / ((t1 - t0) / 1000), 1),
    open_latency: opened.openMs.summary(),
    join_latency: joinMs.summary(),
    quiet,
    ...window,
    errors: stats.errors,
    events: stats.events,
    closes: stats.closes,
    connect_failures: opened.failures,
  };
}

// --- main -----------------------------------------------------------------------------------

async function main() {
  const args = parseArgs(process.argv);
  for (const url of args.urls) {
    const host = new URL(url).hostname;
    if (host !== "127.0.0.1" && host !== "localhost" && host !== "[::1]") {
      throw new Error(`refusing to load ${url}: loopback only`);
    }
  }
  // A hard stop, whatever happens: the runner also has its own timeout.
  const guard = setTimeout(() => {
    log(`giving up after ${args.maxSeconds} s`);
    process.exit(3);
  }, args.maxSeconds * 1000);
  guard.unref();
  const workloads = { fanout, rooms, idle, connect };
  const run = workloads[args.workload];
  if (!run) throw new Error(`unknown workload ${args.workload}`);
  const result = await run(args);
  result.system = args.system;
  result.node = process.version;
  process.stdout.write(JSON.stringify(result) + "\n");
  process.exit(0); // socket.io timers would otherwise keep the loop alive
}

main().catch((err) => {
  log(`failed: ${err && err.stack ? err.stack : err}`);
  process.exit(2);
});
