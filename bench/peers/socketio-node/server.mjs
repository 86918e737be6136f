// The Node.js Socket.IO peer for bench/run.py: trio-chat's room semantics on socket.io 4.8,
// the same events, acks and JWT check as the python-socketio peer (../socketio_server.py), so
// that the load generator's `--system socketio` client drives either one unchanged.
//
// socket.io's Server with @socket.io/redis-adapter (the classic Pub/Sub adapter, on the
// `redis` npm client: one publishing and one subscribed connection per instance), so that a
// message sent through one instance reaches the room's members on every instance.
//
// - connect: the client passes auth {token: JWT}; the HS256 token is verified (jsonwebtoken,
//   algorithms ["HS256"]; sub, iat, exp required; sub a string, iat not in the future, like
//   PyJWT 2.x), secret from TRIO_CHAT_AUTH_JWT_SECRET, else the connection is refused
//   (connect_error "missing_token" / "invalid_token").
// - "join" {room: R} -> ack {type: "joined", room: R} (ack {type:"error",code:"bad_request"}
//   unless R is a non-empty string).
// - "send" {room: R, data: D} -> "message" {id, room, from, data, ts} to R on every instance
//   except the sender's own socket; ack {type: "ack", id, ts}. Sending to a room the socket
//   has not joined acks {type: "error", code: "not_in_room"}.
// No compression anywhere (perMessageDeflate false, httpCompression false), websocket
// transport only, no client bundle served. Like the python peer it keeps no session records
// in Redis: its only Redis traffic is the adapter's Pub/Sub (PUBLISH on socket.io#/#<room>#,
// every instance PSUBSCRIBEd to socket.io#/#*). Unlike python-socketio, whose Redis manager
// sends every emit through Redis and delivers it on the way back (also to the sender's own
// instance), the adapter delivers to local members at once and publishes for the others.
//
// Run (from anywhere; the dependencies are in this directory's node_modules):
//   TRIO_CHAT_AUTH_JWT_SECRET=... BENCH_REDIS_URL=redis://127.0.0.1:PORT/0 \
//     node bench/peers/socketio-node/server.mjs --host 127.0.0.1 --port P [--name NAME]
// Ready once it prints "socketio-node running on http://HOST:P" (after its Redis clients are
// connected and subscribed and the port is listening). SIGTERM/SIGINT: closes every client,
// the port and Redis, prints "socketio-node stopped: accepted N connections, refused M" and
// exits 0.

import { randomUUID } from "node:crypto";
import { createServer } from "node:http";
import { setTimeout as sleep } from "node:timers/promises";

import { createAdapter } from "@socket.io/redis-adapter";
import jwt from "jsonwebtoken";
import { createClient } from "redis";
import { Server } from "socket.io";

function parseArgs(argv) {
  const args = { host: "127.0.0.1", port: 0, name: "socketio-node", backlog: 2048 };
  for (let i = 2; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, "");
    if (!(key in args) || argv[i + 1] === undefined) throw new Error(`bad option ${argv[i]}`);
    args[key] = typeof args[key] === "number" ? Number(argv[i + 1]) : argv[i + 1];
  }
  return args;
}

const args = parseArgs(process.argv);
const SECRET = process.env.TRIO_CHAT_AUTH_JWT_SECRET;
const REDIS_URL = process.env.BENCH_REDIS_URL;
if (!SECRET || !REDIS_URL) {
  process.stderr.write("ERROR TRIO_CHAT_AUTH_JWT_SECRET and BENCH_REDIS_URL are required\n");
  process.exit(2);
}
const log = (line) => process.stdout.write(`${new Date().toISOString()} ${args.name}: ${line}\n`);

// --- Redis: the adapter's two connections -------------------------------------------------

const pubClient = createClient({ url: REDIS_URL });
const subClient = pubClient.duplicate();
for (const [role, client] of [["pub", pubClient], ["sub", subClient]]) {
  client.on("error", (err) => log(`ERROR redis ${role}: ${err && err.message ? err.message : err}`));
}
await Promise.all([pubClient.connect(), subClient.connect()]);

// --- Socket.IO ------------------------------------------------------------------------------

const httpServer = createServer();
const io = new Server(httpServer, {
  transports: ["websocket"], // the load generator never polls
  perMessageDeflate: false,
  httpCompression: false,
  serveClient: false,
  // python-engineio's defaults, which socket.io's happen to equal: ping 25 s / timeout 20 s,
  // 1 MB per message
  pingInterval: 25000,
  pingTimeout: 20000,
  maxHttpBufferSize: 1e6,
  adapter: createAdapter(pubClient, subClient),
});

let accepted = 0;
let refused = 0;

function verify(token) {
  const claims = jwt.verify(token, SECRET, { algorithms: ["HS256"] }); // signature, exp, nbf
  const now = Math.floor(Date.now() / 1000);
  for (const claim of ["sub", "iat", "exp"]) {
    if (claims[claim] === undefined) throw new Error(`missing ${claim}`);
  }
  if (typeof claims.sub !== "string") throw new Error("sub must be a string");
  if (typeof claims.iat !== "number" || claims.iat > now) throw new Error("bad iat");
  return claims;
}

io.use((socket, next) => {
  const auth = socket.handshake.auth;
  const token = auth && typeof auth === "object" ? auth.token : undefined;
  if (!token) {
    refused++;
    return next(new Error("missing_token"));
  }
  let claims;
  try {
    claims = verify(String(token));
  } catch {
    refused++;
    return next(new Error("invalid_token"));
  }
  socket.data.user = String(claims.sub);
  next();
});

io.on("connection", (socket) => {
  accepted++;
  socket.on("join", (data, ack) => {
    const room = data && typeof data === "object" ? data.room : undefined;
    let reply;
    if (typeof room !== "string" || !room) {
      reply = { type: "error", code: "bad_request" };
    } else {
      socket.join(room); // the in-memory part of the adapter: synchronous
      reply = { type: "joined", room };
    }
    if (typeof ack === "function") ack(reply);
  });
  socket.on("send", (data, ack) => {
    const room = data && typeof data === "object" ? data.room : undefined;
    let reply;
    if (typeof room !== "string" || !socket.rooms.has(room)) {
      reply = { type: "error", code: "not_in_room" };
    } else {
      const id = randomUUID().replaceAll("-", "");
      const ts = Date.now();
      // to every member of room on every instance but this socket (python's skip_sid)
      socket.to(room).emit("message", { id, room, from: socket.data.user, data: data.data, ts });
      reply = { type: "ack", id, ts };
    }
    if (typeof ack === "function") ack(reply);
  });
});

// --- ready: subscribed, then listening --------------------------------------------------------

const adapter = io.of("/").adapter;
for (let i = 0; ; i++) {
  // the adapter subscribes (PSUBSCRIBE socket.io#/#*, then SUBSCRIBE ... <uid>#) on its own;
  // once its per-instance channel has a subscriber, the earlier pattern is in place too
  const counts = await pubClient.pubSubNumSub(adapter.specificResponseChannel);
  if (counts[adapter.specificResponseChannel] >= 1) break;
  if (i > 500) throw new Error("the Redis adapter did not subscribe");
  await sleep(10);
}
await new Promise((resolve, reject) => {
  httpServer.once("error", reject);
  httpServer.listen(args.port, args.host, args.backlog, resolve);
});
const port = httpServer.address().port;
log(`socketio-node running on http://${args.host}:${port} (pid ${process.pid}, ` +
  `node ${process.version}, adapter uid ${adapter.uid})`);

// --- stop -------------------------------------------------------------------------------------

let stopping = false;
async function shutdown(signal) {
  if (stopping) return;
  stopping = true;
  log(`${signal}: stopping`);
  setTimeout(() => {
    log("WARNING not stopped after 5 s: exiting anyway");
    process.exit(1);
  }, 5000).unref();
  await new Promise((resolve) => io.close(() => resolve())); // every client, then the port
  await Promise.allSettled([pubClient.quit(), subClient.quit()]);
  log(`socketio-node stopped: accepted ${accepted} connections, refused ${refused}`);
  process.exit(0);
}
process.on("SIGTERM", () => shutdown("SIGTERM"));
process.on("SIGINT", () => shutdown("SIGINT"));
