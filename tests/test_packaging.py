"""The distribution, as a user gets it: ``python -m build`` gives an sdist and a wheel that
``twine check`` passes, and the wheel, installed into a clean virtual environment (not
editable, not this checkout), prints its version and serves ``/client.js``, the pages and
``openapi.json``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import httpx
import pytest
import trio
from _chat import SECRET
from _redis_server import free_port

import trio_chat

ROOT = Path(__file__).resolve().parent.parent
VERSION = trio_chat.__version__


def _run(*command: str | Path, cwd: Path | None = None, timeout: float = 300) -> str:
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"
    return done.stdout


def _sources(target: Path) -> None:
    """Copy what a release is made from (the tracked files) to ``target``."""
    listed = _run("git", "ls-files", cwd=ROOT).splitlines() if (ROOT / ".git").exists() else []
    if not listed:  # not a git checkout: the package and what pyproject.toml names
        listed = [str(p.relative_to(ROOT)) for p in (ROOT / "trio_chat").rglob("*") if p.is_file()]
        listed += ["pyproject.toml", "README.md"]
    for name in listed:
        if "__pycache__" in name or not (ROOT / name).is_file():
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target / name)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    _sources(source)
    _run(sys.executable, "-m", "build", "--outdir", out, source)
    return out


def test_build_gives_an_sdist_and_a_wheel_that_twine_accepts(dist: Path) -> None:
    wheel, sdist = (
        dist / f"trio_chat-{VERSION}-py3-none-any.whl",
        dist / f"trio_chat-{VERSION}.tar.gz",
    )
    assert sorted(dist.iterdir()) == sorted([wheel, sdist])
    checked = _run(sys.executable, "-m", "twine", "check", "--strict", wheel, sdist)
    assert checked.count("PASSED") == 2, checked
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"trio_chat-{VERSION}.dist-info/METADATA").decode()
    for packaged in ("_web/static/client.js", "_web/openapi.json", "py.typed", "_cli/main.py"):
        assert f"trio_chat/{packaged}" in names
    assert f"Version: {VERSION}\n" in metadata
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]
    with tarfile.open(sdist) as archive:
        assert f"trio_chat-{VERSION}/trio_chat/_web/static/demo.html" in archive.getnames()


async def test_the_wheel_in_a_clean_venv_serves_the_client_the_pages_and_openapi(
    dist: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    _run(venv / "bin" / "pip", "install", "--quiet", dist / f"trio_chat-{VERSION}-py3-none-any.whl")
    # (run elsewhere than this checkout, whose trio_chat/ would be imported instead)
    version = _run(venv / "bin" / "trio-chat", "--version", cwd=tmp_path)
    assert version.strip() == f"trio-chat {VERSION}"
    where = _run(
        venv / "bin" / "python", "-c", "import trio_chat; print(trio_chat.__file__)", cwd=tmp_path
    )
    assert where.startswith(str(venv)), where  # the installed copy, not this checkout

    admin_port, log = free_port(), tmp_path / "serve.log"
    environ = {**os.environ, "TRIO_CHAT_AUTH_JWT_SECRET": SECRET, "TRIO_CHAT_ADMIN_DEMO": "true"}
    command = [venv / "bin" / "trio-chat", "serve", "--port", "0", "--admin-port", admin_port]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [str(c) for c in command], env=environ, stderr=sink, cwd=tmp_path
        )
    try:
        with trio.fail_after(20):
            while not re.search(r"listening on ws://", log.read_text()):
                assert process.poll() is None, log.read_text()
                await trio.sleep(0.05)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin_port}") as http:
                while True:  # the admin listener may come up just after the WebSocket one
                    try:
                        client_js = await http.get("/client.js")
                        break
                    except httpx.TransportError:
                        await trio.sleep(0.05)
                assert client_js.status_code == 200
                assert "javascript" in client_js.headers["content-type"]
                packaged = (ROOT / "trio_chat" / "_web" / "static" / "client.js").read_bytes()
                assert client_js.content == packaged
                for page in ("/", "/demo/"):
                    r = await http.get(page)
                    assert r.status_code == 200, page
                    assert r.headers["content-type"].startswith("text/html"), page
                openapi = (await http.get("/openapi.json")).json()
                assert openapi["info"]["title"] == "trio-chat admin API"
                assert "/v1/publish" in openapi["paths"]
    finally:
        process.terminate()
        process.wait(15)
