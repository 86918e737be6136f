"""The pages of the admin port over HTTP (SPEC §13): headers, the demo switch, demo tokens.
What the pages do in a browser is tests/test_browser.py's."""

from __future__ import annotations

import time

import pytest
import trio
from _chat import ADMIN, admin_client, make_config, start

from trio_chat.client import open_client

DEMO = {**ADMIN, "demo": True}


async def test_pages_forbid_inline_script_and_other_origins(nursery):
    server = await start(nursery, make_config(admin=DEMO))
    with trio.fail_after(10):
        async with admin_client(server, key=None) as http:
            for path in ("/", "/demo/"):
                r = await http.get(path)
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/html")
                policy = r.headers["content-security-policy"]
                assert "script-src 'self';" in policy
                assert "'unsafe-inline'" not in policy
                assert f"connect-src 'self' ws://127.0.0.1:{server.port}" in policy
                assert "frame-ancestors 'none'" in policy
                assert r.headers["x-content-type-options"] == "nosniff"
                assert "<script>" not in r.text  # every script is a file of ours
            r = await http.get("/client.js", headers={"Origin": "https://app.example.com"})
            assert r.headers["content-type"].startswith("text/javascript")
            assert r.headers["access-control-allow-origin"] == "*"
            assert "export class TrioChat extends EventTarget" in r.text


async def test_only_the_packaged_files_are_served(nursery):
    server = await start(nursery, make_config(admin=DEMO))
    async with admin_client(server, key=None) as http:
        for path in (
            "/static/nothing.js",
            "/static/demo.html",  # pages only at their own path, with their headers
            "/static/..%2Fadmin.py",
            "/static/%2E%2E%2Fopenapi.json",
        ):
            r = await http.get(path)
            assert r.status_code == 404, path
            assert r.json()["error"] == "not_found"


async def test_without_admin_demo_there_is_no_demo(nursery):
    server = await start(nursery, make_config(admin=ADMIN))
    async with admin_client(server, key=None) as http:
        assert (await http.get("/demo/")).status_code == 404
        r = await http.post("/demo/token", json={"user": "alice"})
        assert (r.status_code, r.json()["error"]) == (404, "not_found")
        assert (await http.get("/")).status_code == 200  # the dashboard needs the key anyway


async def test_a_demo_token_is_accepted_by_the_server_it_names(nursery):
    server = await start(nursery, make_config(admin=DEMO))
    with trio.fail_after(10):
        async with admin_client(server, key=None) as http:
            r = await http.post("/demo/token", json={"user": "ada lovelace"})
            assert r.status_code == 200
            body = r.json()
        assert body["url"] == server.url
        async with open_client(body["url"], body["token"]) as chat:
            assert chat.welcome["user_id"] == "ada lovelace"
            assert 890 <= chat.welcome["expires_at"] - time.time() <= 900  # 15 minutes


@pytest.mark.parametrize("user", [None, "", 5, "x" * 65, "tab\there"])
async def test_a_bad_demo_user_is_422(nursery, user):
    server = await start(nursery, make_config(admin=DEMO))
    async with admin_client(server, key=None) as http:
        r = await http.post("/demo/token", json={"user": user})
    assert (r.status_code, r.json()["error"]) == (422, "invalid_field")


async def test_public_url_is_what_pages_and_tokens_point_to(nursery):
    public = "wss://chat.example.com/socket"
    server = await start(nursery, make_config(admin=DEMO, server={"public_url": public}))
    async with admin_client(server, key=None) as http:
        assert (await http.post("/demo/token", json={"user": "a"})).json()["url"] == public
        policy = (await http.get("/demo/")).headers["content-security-policy"]
    assert "connect-src 'self' wss://chat.example.com;" in policy
