"""An application that serves trio-chat's HTTP hooks (SPEC §14), for ``trio-chat serve``.

Run it, then point an instance at it::

    python examples/hooks_app.py --port 9000 --secret s3cret --db chat.sqlite
    TRIO_CHAT_HOOKS_URL=http://127.0.0.1:9000/hooks TRIO_CHAT_HOOKS_SECRET=s3cret \\
        TRIO_CHAT_AUTH_JWT_SECRET=... trio-chat serve

Its rules, as a product's would be:

- ``connect``: users in ``BLOCKED`` are refused; everyone else gets ``info`` (a display name)
  and joins ``lobby`` at once.
- ``join``: rooms ``staff-*`` only for users in ``STAFF``; ``announcements`` is read-only for
  everyone but staff.
- ``send``: words in ``MASKED`` become asterisks, and every message is kept in SQLite (the
  standard library's ``sqlite3``): ``GET /rooms/<room>/messages`` lists them.
- ``disconnect``: counted, by reason (``GET /disconnects``).

Every request's signature is checked first (HMAC-SHA256 of ``<timestamp>.<body>``, at most
five minutes old): a request that is not trio-chat's gets 401, which trio-chat counts as a
failure and fails closed on.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import re
import sqlite3
import time
from collections import Counter
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

if TYPE_CHECKING:
    from starlette.requests import Request

BLOCKED = {"mallory"}
STAFF = {"alice"}
MASKED = re.compile(r"\b(darn|heck)\b", re.IGNORECASE)
#: seconds a signed request stays valid (a replayed one is refused after)
MAX_AGE = 300


def create_app(secret: str, db_path: str) -> Starlette:
    db = sqlite3.connect(db_path, check_same_thread=False)
    db.execute("CREATE TABLE IF NOT EXISTS messages (room TEXT, user TEXT, data TEXT, at REAL)")
    disconnects: Counter[str] = Counter()

    async def signed(request: Request) -> dict[str, Any] | None:
        """The request's JSON body if trio-chat signed it, else None."""
        body = await request.body()
        timestamp = request.headers.get("x-trio-chat-timestamp", "")
        given = request.headers.get("x-trio-chat-signature", "")
        mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
        if not hmac.compare_digest(given, f"sha256={mac.hexdigest()}"):
            return None
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > MAX_AGE:
            return None
        event: dict[str, Any] = json.loads(body)
        return event

    async def hook(request: Request) -> JSONResponse:
        event = await signed(request)
        if event is None:
            return JSONResponse({"error": "bad signature"}, status_code=401)
        match request.path_params["hook"]:
            case "connect":
                if event["user"] in BLOCKED:
                    return JSONResponse({"allow": False, "reason": "blocked by the app"})
                name = event["user"].replace("-", " ").title()
                return JSONResponse({"allow": True, "info": {"name": name}, "rooms": ["lobby"]})
            case "join":
                room, staff = event["room"], event["user"] in STAFF
                if fnmatchcase(room, "staff-*") and not staff:
                    return JSONResponse({"allow": False, "reason": "staff only"})
                return JSONResponse({"allow": True, "publish": room != "announcements" or staff})
            case "send":
                data = event["data"]
                if isinstance(data, dict) and isinstance(data.get("text"), str):
                    data = {**data, "text": MASKED.sub(lambda m: "*" * len(m[0]), data["text"])}
                db.execute(
                    "INSERT INTO messages VALUES (?, ?, ?, ?)",
                    (event["room"], event["user"], json.dumps(data), time.time()),
                )
                db.commit()
                return JSONResponse({"allow": True, "data": data})
            case "direct":
                return JSONResponse({"allow": True})
            case "disconnect":
                disconnects[event["reason"]] += 1
                return JSONResponse({})
            case other:
                return JSONResponse({"error": f"no hook {other}"}, status_code=404)

    async def messages(request: Request) -> JSONResponse:
        rows = db.execute(
            "SELECT user, data FROM messages WHERE room = ? ORDER BY rowid",
            (request.path_params["room"],),
        ).fetchall()
        return JSONResponse([{"user": user, "data": json.loads(data)} for user, data in rows])

    async def disconnect_counts(request: Request) -> JSONResponse:
        return JSONResponse(dict(disconnects))

    return Starlette(
        routes=[
            Route("/hooks/{hook}", hook, methods=["POST"]),
            Route("/rooms/{room}/messages", messages, methods=["GET"]),
            Route("/disconnects", disconnect_counts, methods=["GET"]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--secret", required=True, help="the same as trio-chat's hooks.secret")
    parser.add_argument("--db", default="chat.sqlite", help="SQLite file for the messages")
    args = parser.parse_args()
    config = HypercornConfig()
    config.bind = [f"{args.host}:{args.port}"]
    config.accesslog = None
    print(f"hooks app on http://{args.host}:{args.port}/hooks", flush=True)
    trio.run(serve, create_app(args.secret, args.db), config)


if __name__ == "__main__":
    main()
