"""The admin HTTP API (SPEC §9): a Starlette app, served by Hypercorn's trio worker.

Open: ``GET /healthz``, ``/readyz``, ``/metrics``, ``/openapi.json``. Everything under ``/v1``
needs ``Authorization: Bearer <admin.api_key>``. Every answer is JSON, errors included
(``{"error", "message"}``); what the operations do in Redis is in ``_operations``. The
OpenAPI description is ``openapi.json`` beside this file.
"""

from __future__ import annotations

import hmac
import logging
import re
from contextlib import aclosing
from functools import partial
from importlib import resources
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import hypercorn
import hypercorn.trio
import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import _operations as ops
from .._auth import NoSigningKey, mint_token
from .._errors import BackendUnavailable
from .._messages import DEFAULT_HISTORY_PAGE, MAX_HISTORY_PAGE, ROOM_ID, is_user_id
from .._messages import loads as strict_loads
from . import pages

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from hypercorn.typing import ASGIFramework

    from .._config import Config
    from .._hub import Hub

    Handler = Callable[[Request], Awaitable[Response | dict[str, Any]]]

logger = logging.getLogger(__name__)
#: Hypercorn's own log: its INFO lines ("Running on ... CTRL + C to quit") repeat ours
_server_logger = logging.getLogger(f"{__name__}.hypercorn")
_server_logger.setLevel(logging.WARNING)

#: session ids are 128 random bits, url-safe (SPEC §5)
#: the demo page's tokens: long enough to try things out, short enough not to matter
DEMO_TOKEN_SECONDS = 15 * 60
DEMO_USER_CHARS = 64
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
#: room and data fit in ``limits.max_message_bytes``; this leaves room for JSON whitespace
_BODY_SLACK = 4096


class ApiError(Exception):
    """Answered as ``status`` with ``{"error": code, "message": message}``."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The one shape of every error answer: ``{"error": code, "message": message}``."""
    return JSONResponse({"error": code, "message": message}, status, headers)


def create_app(
    config: Config,
    hub: Hub,
    *,
    metrics: Callable[[], tuple[bytes, str]] | None = None,
    ws_url: str | None = None,
) -> Starlette:
    """Build the admin API for one instance, with its pages (SPEC §13).

    Args:
        config: the server configuration (``admin.api_key`` guards ``/v1``).
        hub: this instance's hub; it must outlive the app.
        metrics: returns ``(body, content type)`` of the Prometheus exposition for
            ``GET /metrics`` (``_metrics.Metrics.render``); None answers 501.
            Wire ``_metrics`` where ``_server._serve_connections`` starts :func:`serve_admin`.
        ws_url: the WebSocket URL pages connect to: ``server.public_url``, else the bound
            listener's; None: ``server.public_url`` or the configured host, port and path.
    """
    api = _AdminApi(config, hub, metrics, ws_url or config.server.public_url or _ws_url(config))
    v1 = api.v1
    routes = [
        Route("/", api.open(api.dashboard), methods=["GET"]),
        Route("/client.js", api.open(api.client_js), methods=["GET"]),
        Route("/static/{name}", api.open(api.static), methods=["GET"]),
        Route("/demo/", api.open(api.demo_page), methods=["GET"]),
        Route("/demo/token", api.open(api.demo_token), methods=["POST"]),
        Route("/healthz", api.open(api.healthz), methods=["GET"]),
        Route("/readyz", api.open(api.readyz), methods=["GET"]),
        Route("/metrics", api.open(api.metrics), methods=["GET"]),
        Route("/openapi.json", api.open(api.openapi), methods=["GET"]),
        Route("/v1/publish", v1(api.publish), methods=["POST"]),
        # user ids may hold "/" (SPEC allows any non-space), sent as %2F: match the whole rest
        Route("/v1/users/{user_id:path}/logout", v1(api.logout), methods=["POST"]),
        Route("/v1/users/{user_id:path}/direct", v1(api.direct), methods=["POST"]),
        Route("/v1/users/{user_id:path}/ban", v1(api.ban), methods=["POST"]),
        Route("/v1/users/{user_id:path}/unban", v1(api.unban), methods=["POST"]),
        Route("/v1/users/{user_id:path}/mute", v1(api.mute), methods=["POST"]),
        Route("/v1/users/{user_id:path}/sessions", v1(api.sessions), methods=["GET"]),
        Route("/v1/sessions/{session_id}", v1(api.kick), methods=["DELETE"]),
        Route("/v1/rooms/{room}/presence", v1(api.presence), methods=["GET"]),
        Route("/v1/rooms/{room}/history", v1(api.history), methods=["GET"]),
        Route("/v1/rooms", v1(api.rooms), methods=["GET"]),
        Route("/v1/instances", v1(api.instances), methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
    )


async def serve_admin(
    config: Config,
    hub: Hub,
    *,
    metrics: Callable[[], tuple[bytes, str]] | None = None,
    ws_url: str | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin API on ``admin.host``/``admin.port`` until cancelled.

    ``task_status.started()`` reports the bound port once the listener is bound. Cancelling
    closes the listener and cuts any request in flight. ``metrics``, ``ws_url``: see
    :func:`create_app`.
    """
    settings = hypercorn.Config()
    host, port = config.admin.host, config.admin.port
    settings.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    settings.errorlog = _server_logger  # a logger object: Hypercorn adds no handler of its own
    settings.include_server_header = False
    if config.admin.tls_cert is not None and config.admin.tls_key is not None:
        settings.certfile, settings.keyfile = config.admin.tls_cert, config.admin.tls_key
    if not config.admin.api_key:
        logger.warning("admin.api_key is not set: every /v1 request is refused with 401")
    # Starlette's ASGI type hints are looser than Hypercorn's; the protocol is the same.
    app = cast("ASGIFramework", create_app(config, hub, metrics=metrics, ws_url=ws_url))
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            partial(hypercorn.trio.serve, app, settings, mode="asgi")
        )
        bound = urlsplit(binds[0])
        assert bound.port is not None
        logger.info("admin API listening on %s", binds[0])
        task_status.started(bound.port)


def _ws_url(config: Config) -> str:
    server = config.server
    return f"ws://{server.host}:{server.port}{server.path}"


class _AdminApi:
    def __init__(
        self,
        config: Config,
        hub: Hub,
        metrics: Callable[[], tuple[bytes, str]] | None,
        ws_url: str,
    ) -> None:
        self.config = config
        self.hub = hub
        self.ops = ops.Operator(hub)
        self._metrics = metrics
        self._ws_url = ws_url
        self._files = pages.static_files()
        self._page_headers = pages.page_headers(ws_url)
        key = config.admin.api_key
        self._key = key.encode() if key else None
        self._openapi = resources.files(__package__).joinpath("openapi.json").read_bytes()

    # --- wrappers: authentication and errors -------------------------------------------------

    def open(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """An endpoint whose errors, expected or not, are JSON answers, never a traceback."""

        async def endpoint(request: Request) -> Response:
            try:
                result = await handler(request)
            except ApiError as exc:
                return error_response(exc.status, exc.code, exc.message, exc.headers)
            except BackendUnavailable as exc:
                logger.warning("admin %s %s: %s", request.method, request.url.path, exc)
                return error_response(503, "unavailable", "store unreachable")
            except ops.NoRecord as exc:
                return error_response(404, "no_record", str(exc))
            except ops.PayloadTooLarge as exc:
                return error_response(413, "too_large", str(exc))
            except ops.InvalidArgument as exc:
                return error_response(422, "invalid_field", str(exc))
            except ClientDisconnect:
                return error_response(400, "bad_request", "client disconnected")
            except Exception:
                logger.exception("admin %s %s failed", request.method, request.url.path)
                return error_response(500, "internal", "internal error")
            return result if isinstance(result, Response) else JSONResponse(result)

        return endpoint

    def v1(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """An :meth:`open` endpoint that first checks the bearer key."""

        async def authenticated(request: Request) -> Response | dict[str, Any]:
            self._authenticate(request)
            return await handler(request)

        return self.open(authenticated)

    def _authenticate(self, request: Request) -> None:
        challenge = {"WWW-Authenticate": "Bearer"}
        if self._key is None:
            raise ApiError(401, "unauthorized", "admin.api_key is not configured", challenge)
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken must not tell how much of a guess was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._key):
            raise ApiError(401, "unauthorized", "missing or wrong bearer key", challenge)

    # --- open endpoints ----------------------------------------------------------------------

    async def healthz(self, request: Request) -> dict[str, Any]:
        return {"status": "ok"}

    async def readyz(self, request: Request) -> Response:
        reasons, cluster = await ops.readiness(self.hub)
        extra = {} if cluster is None else {"cluster": cluster}
        if reasons:
            return JSONResponse({"status": "not_ready", "reasons": reasons, **extra}, 503)
        return JSONResponse({"status": "ready", **extra})

    async def metrics(self, request: Request) -> Response:
        if self._metrics is None:
            return error_response(501, "not_implemented", "metrics are not wired yet")
        body, content_type = self._metrics()
        return Response(body, media_type=content_type)

    async def openapi(self, request: Request) -> Response:
        return Response(self._openapi, media_type="application/json")

    # --- pages (SPEC §13) ---------------------------------------------------------------------

    async def dashboard(self, request: Request) -> Response:
        return self._page("dashboard.html")

    async def demo_page(self, request: Request) -> Response:
        self._demo_only()
        return self._page("demo.html")

    async def client_js(self, request: Request) -> Response:
        response = self._file("client.js")
        # public code: a page of another origin may import it (module scripts use CORS)
        response.headers["Access-Control-Allow-Origin"] = "*"
        return response

    async def static(self, request: Request) -> Response:
        return self._file(request.path_params["name"])

    async def demo_token(self, request: Request) -> dict[str, Any]:
        """A token for any user name, 15 minutes (only with ``admin.demo``)."""
        self._demo_only()
        user = (await self._body(request)).get("user")
        if (
            not isinstance(user, str)
            or not 0 < len(user) <= DEMO_USER_CHARS
            or not is_user_id(user)
        ):
            raise ApiError(
                422, "invalid_field", f"'user' must be 1-{DEMO_USER_CHARS} printable characters"
            )
        try:
            token = mint_token(self.config.auth, user, ttl=DEMO_TOKEN_SECONDS)
        except NoSigningKey as exc:
            raise ApiError(409, "no_signing_key", f"cannot mint tokens: {exc}") from exc
        return {"token": token, "url": self._ws_url}

    def _demo_only(self) -> None:
        if not self.config.admin.demo:
            raise ApiError(404, "not_found", "the demo is off (admin.demo)")

    def _page(self, name: str) -> Response:
        return Response(
            self._files[name], media_type=pages.content_type(name), headers=self._page_headers
        )

    def _file(self, name: str) -> Response:
        if name not in self._files or name.endswith(".html"):
            raise ApiError(404, "not_found", f"no file {name[:64]!r}")
        headers = {
            "Cache-Control": f"public, max-age={pages.CACHE_SECONDS}",
            "X-Content-Type-Options": "nosniff",
        }
        return Response(self._files[name], media_type=pages.content_type(name), headers=headers)

    # --- /v1 ---------------------------------------------------------------------------------

    async def publish(self, request: Request) -> dict[str, Any]:
        body = await self._body(request)
        if "data" not in body:
            raise ApiError(422, "invalid_field", "'data' is required")
        return await self.ops.publish(body.get("room"), body["data"], sender=body.get("from"))

    async def direct(self, request: Request) -> dict[str, Any]:
        user_id = _path_id(request, "user_id", is_user_id)
        body = await self._body(request)
        if "data" not in body:
            raise ApiError(422, "invalid_field", "'data' is required")
        return await self.ops.direct(user_id, body["data"], sender=body.get("from"))

    async def logout(self, request: Request) -> dict[str, Any]:
        return await self.ops.logout(_path_id(request, "user_id", is_user_id))

    async def ban(self, request: Request) -> dict[str, Any]:
        return await self.ops.ban(_path_id(request, "user_id", is_user_id))

    async def unban(self, request: Request) -> dict[str, Any]:
        return await self.ops.unban(_path_id(request, "user_id", is_user_id))

    async def mute(self, request: Request) -> dict[str, Any]:
        user_id = _path_id(request, "user_id", is_user_id)
        return await self.ops.mute(user_id, (await self._body(request)).get("seconds"))

    async def sessions(self, request: Request) -> dict[str, Any]:
        return await self.ops.sessions(_path_id(request, "user_id", is_user_id))

    async def kick(self, request: Request) -> dict[str, Any]:
        session_id = _path_id(request, "session_id", SESSION_ID.fullmatch)
        if (closed := await self.ops.kick(session_id)) is None:
            raise ApiError(404, "not_found", f"no session {session_id!r}")
        return closed

    async def presence(self, request: Request) -> dict[str, Any]:
        return await self.ops.presence(_path_id(request, "room", ROOM_ID.fullmatch))

    async def history(self, request: Request) -> dict[str, Any]:
        room = _path_id(request, "room", ROOM_ID.fullmatch)
        raw_limit = request.query_params.get("limit", str(DEFAULT_HISTORY_PAGE))
        if (
            not re.fullmatch(r"[0-9]{1,3}", raw_limit)
            or not 1 <= int(raw_limit) <= MAX_HISTORY_PAGE
        ):
            raise ApiError(
                400, "bad_request", f"'limit' must be an integer in 1-{MAX_HISTORY_PAGE}"
            )
        before = request.query_params.get("before")
        try:
            return await self.ops.history(room, before=before, limit=int(raw_limit))
        except ops.InvalidArgument as exc:  # a query parameter: 400, as for 'limit'
            raise ApiError(400, "bad_request", str(exc)) from exc

    async def instances(self, request: Request) -> dict[str, Any]:
        return await self.ops.instances()

    async def rooms(self, request: Request) -> dict[str, Any]:
        raw_limit = request.query_params.get("limit", str(ops.DEFAULT_ROOMS_PAGE))
        if (
            not re.fullmatch(r"[0-9]{1,4}", raw_limit)
            or not 1 <= int(raw_limit) <= ops.MAX_ROOMS_PAGE
        ):
            raise ApiError(
                400, "bad_request", f"'limit' must be an integer in 1-{ops.MAX_ROOMS_PAGE}"
            )
        return await self.ops.rooms(int(raw_limit))

    async def _body(self, request: Request) -> dict[str, Any]:
        """The JSON object in the body, read up to a bound: 413 beyond, 400 if not JSON, 422 if
        not an object."""
        limit = self.config.limits.max_message_bytes + _BODY_SLACK
        raw = bytearray()
        async with aclosing(request.stream()) as chunks:  # closed even when we stop early
            async for chunk in chunks:
                raw += chunk
                if len(raw) > limit:
                    raise ApiError(413, "too_large", f"body over {limit} bytes")
        try:
            # NaN and Infinity (or 1e400) are not JSON: relayed, they would break clients' parsers
            body = strict_loads(raw)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError included
            raise ApiError(400, "bad_request", f"body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(422, "invalid_field", "body must be a JSON object")
        return body


def _path_id(request: Request, name: str, valid: Callable[[str], object]) -> str:
    value: str = request.path_params[name]
    if not valid(value):
        raise ApiError(400, "bad_request", f"{name} {value[:64]!r} is not a valid id")
    return value


async def _http_error(request: Request, exc: Exception) -> Response:
    """Routing's own errors (404, 405), as JSON."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, exc.detail, exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    """Last resort for an error outside the endpoints (Starlette logs and re-raises it)."""
    return error_response(500, "internal", "internal error")
