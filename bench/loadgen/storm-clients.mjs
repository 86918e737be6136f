// The clients of bench/storm.py's reconnect storm, in Node.js (a far cheaper load generator
// than as many Python clients: see bench/README.md). Same protocol as storm.py's Python
// client process: one JSON config as the only argument; on stdout "READY <n>" once every
// client is connected to instance A and joined, "REJOINED <ok> <failed>" once every client
// has reconnected to B and its `join {room, since}` was answered, then, after "STOP" on
// stdin, the records are written to config.out and "DONE" is printed.
//
// Times are CLOCK_MONOTONIC seconds (process.hrtime, as Python's time.monotonic()), so that
// storm.py can compare them with the kill and with its senders' acks. A client reconnects
// as soon as its connection to A ends (after a random delay of up to config.jitter s), and
// only ever connects to config.url_a and config.url_b (127.0.0.1).

import { createHmac } from "node:crypto";
import { writeFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { setTimeout as sleep } from "node:timers/promises";

import WebSocket from "ws";

const config = JSON.parse(process.argv[2]);
const now = () => Number(process.hrtime.bigint()) / 1e9;
const log = (...parts) => process.stderr.write(`[storm-clients] ${parts.join(" ")}\n`);

const b64url = (buf) => Buffer.from(buf).toString("base64url");
function mintToken(secret, sub) {
  const iat = Math.floor(Date.now() / 1000);
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify({ sub, iat, exp: iat + 3600 }));
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

const records = [];
for (const room of config.rooms) {
  for (let m = 0; m < config.members; m++) {
    const user = `${room}-m${m}`;
    records.push({ room, user, token: mintToken(config.secret, user), before: [] });
  }
}
const counts = { ready: 0, rejoined: 0, failed: 0 };

function countBack(key) {
  counts[key]++;
  if (counts.rejoined + counts.failed === records.length) {
    process.stdout.write(`REJOINED ${counts.rejoined} ${counts.failed}\n`);
  }
}

/** Connect to url and resolve with the socket once `welcome` is read; frames after it go to
 * onFrame, and onClose(reason) is called if it ends after that. */
function connect(url, record, onFrame, onClose) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, {
      perMessageDeflate: false,
      headers: { Authorization: `Bearer ${record.token}` },
      handshakeTimeout: 10000,
    });
    let welcomed = false;
    ws.on("message", (raw) => {
      const frame = JSON.parse(raw.toString());
      if (!welcomed && frame.type === "welcome") {
        welcomed = true;
        resolve(ws);
      } else if (welcomed) {
        onFrame(frame);
      }
    });
    ws.on("error", (err) => {
      if (!welcomed) reject(err);
    });
    ws.on("close", (code) => {
      if (welcomed) onClose(`close ${code}`);
      else reject(new Error(`closed ${code} before welcome`));
    });
  });
}

async function firstVisit(record) {
  let joined;
  const done = new Promise((resolve) => (joined = resolve));
  await connect(
    config.url_a,
    record,
    (frame) => {
      if (frame.type === "joined" && frame.ref === 1) joined();
      else if (frame.type === "message") record.before.push(frame.id);
      else if (frame.type === "error") log(`${record.user} on A: ${JSON.stringify(frame)}`);
    },
    (reason) => {
      record.t_closed = now();
      record.closed_by = reason;
      comeBack(record).catch((err) => log(`${record.user}: ${err.stack}`));
    },
  ).then((ws) => ws.send(JSON.stringify({ type: "join", room: record.room, ref: 1 })));
  await done;
}

async function comeBack(record) {
  if (config.jitter) await sleep(Math.random() * config.jitter * 1000);
  record.t_reconnect = now();
  const since = record.before.length ? record.before[record.before.length - 1] : null;
  record.since = since;
  record.after = [];
  record.errors = [];
  for (let attempt = 1; attempt <= 50; attempt++) {
    record.attempts = attempt;
    try {
      let welcomed = false;
      const ws = await connect(
        config.url_b,
        record,
        (frame) => {
          if (frame.type === "message") record.after.push([now(), frame.id]);
          else if (frame.type === "joined" && frame.ref === 2) {
            record.t_joined = now();
            record.recovered = frame.recovered ?? null;
            record.missed = frame.missed ?? null;
            countBack("rejoined");
          } else if (frame.type === "error") record.errors.push(JSON.stringify(frame));
        },
        (reason) => {
          if (welcomed) record.error_after_join = reason;
        },
      );
      welcomed = true;
      record.t_join_sent = now();
      const join = { type: "join", room: record.room, ref: 2 };
      if (since !== null) join.since = since;
      ws.send(JSON.stringify(join));
      return;
    } catch (err) {
      record.errors.push(String(err && err.message ? err.message : err).slice(0, 200));
      await sleep(50);
    }
  }
  countBack("failed");
}

async function main() {
  let next = 0;
  const worker = async () => {
    while (next < records.length) {
      await firstVisit(records[next++]);
      counts.ready++;
    }
  };
  const timeout = setTimeout(() => {
    log(`only ${counts.ready} of ${records.length} clients opened in ${config.open_timeout} s`);
    process.exit(1);
  }, config.open_timeout * 1000);
  await Promise.all(Array.from({ length: config.concurrency }, worker));
  clearTimeout(timeout);
  process.stdout.write(`READY ${records.length}\n`);
  const lines = createInterface({ input: process.stdin });
  // bounded, from READY: the warm-up, the wait for quiet, the storm, the rest
  const deadline = setTimeout(() => finish(), config.deadline * 1000);
  for await (const line of lines) {
    if (line.trim() === "STOP") break;
  }
  clearTimeout(deadline);
  finish();
}

function finish() {
  for (const record of records) delete record.token;
  writeFileSync(config.out, JSON.stringify(records));
  process.stdout.write("DONE\n");
  process.exit(0);
}

main().catch((err) => {
  log(err.stack);
  process.exit(1);
});
