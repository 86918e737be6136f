"""The browser side of the admin port (SPEC §13): the files of ``trio_chat/_web/static/`` and the
headers pages are served with. No I/O after start-up: the files are read once.
"""

from __future__ import annotations

from importlib import resources
from urllib.parse import urlsplit

#: content types by file extension; a file of any other kind in static/ is not served
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
#: how long browsers may keep client.js and the pages' scripts and styles
CACHE_SECONDS = 300


def static_files() -> dict[str, bytes]:
    """Every servable file of the package's ``static`` folder, by name."""
    folder = resources.files(__package__).joinpath("static")
    return {
        entry.name: entry.read_bytes()
        for entry in folder.iterdir()
        if entry.is_file() and _suffix(entry.name) in CONTENT_TYPES
    }


def content_type(name: str) -> str:
    return CONTENT_TYPES[_suffix(name)]


def page_headers(ws_url: str) -> dict[str, str]:
    """Headers of an HTML page: a Content-Security-Policy that allows no inline script and no
    origin but ours and the WebSocket's, and no framing, sniffing or referrer."""
    parts = urlsplit(ws_url)
    ws_origin = f"{parts.scheme}://{parts.netloc}"
    policy = "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            f"connect-src 'self' {ws_origin}",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }


def _suffix(name: str) -> str:
    dot = name.rfind(".")
    return name[dot:] if dot > 0 else ""
