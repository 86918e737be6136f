"""The application of bench/hooks.py's "http" variant: it checks each hook request's signature,
as examples/hooks_app.py does, and answers ``{"allow": true}``.

Run: python bench/peers/hooks_allow.py --port P --secret S   (Hypercorn on Trio, as the
example; one process per trio-chat instance in the benchmark)
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
from typing import TYPE_CHECKING

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

if TYPE_CHECKING:
    from starlette.requests import Request


def create_app(secret: bytes) -> Starlette:
    async def hook(request: Request) -> Response:
        body = await request.body()
        timestamp = request.headers.get("x-trio-chat-timestamp", "")
        mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
        given = request.headers.get("x-trio-chat-signature", "")
        if not hmac.compare_digest(given, f"sha256={mac.hexdigest()}"):
            return JSONResponse({"error": "bad signature"}, status_code=401)
        return JSONResponse({"allow": True})

    return Starlette(routes=[Route("/hooks/{hook}", hook, methods=["POST"])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret", required=True)
    args = parser.parse_args()
    config = Config()
    config.bind = [f"127.0.0.1:{args.port}"]
    config.accesslog = None
    print(f"hooks app on http://127.0.0.1:{args.port}/hooks", flush=True)
    trio.run(serve, create_app(args.secret.encode()), config)


if __name__ == "__main__":
    main()
