from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import attrs
import jwt
import pytest

from trio_chat._config import Config, ConfigError, load_config

EXAMPLE = Path(__file__).parent.parent / "config" / "trio-chat.toml"
SECRET = "0123456789abcdef0123456789abcdef"  # 32 bytes: PyJWT warns about shorter HMAC keys


def same_instance(config: Config, like: Config) -> Config:
    """``config`` with the generated instance id of ``like``, so that the two compare."""
    return attrs.evolve(
        config, server=attrs.evolve(config.server, instance_id=like.server.instance_id)
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trio-chat.toml"
    path.write_text(text)
    return path


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults() -> None:
    config = load_config(env={})
    assert config == same_instance(Config(), config)
    assert config.server.port == 8765
    assert config.redis.url == "memory://"
    assert config.auth.jwt_secret is None
    assert config.auth.jwt_algorithms == ("HS256",)
    assert config.server.instance_id


def test_example_file_loads_as_the_defaults() -> None:
    config = load_config(EXAMPLE, env={})
    assert config == same_instance(Config(), config)


def test_toml_values(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [server]
        port = 9000
        instance_id = "chat-1"
        shutdown_timeout = 3
        [auth]
        jwt_algorithms = ["HS512", "RS256"]
        allowed_origins = ["https://a.example"]
        require_record = true
        [limits]
        max_message_bytes = 1024
        send_rate = 2.5
        """,
    )
    config = load_config(path, env={})
    assert config.server.port == 9000
    assert config.server.instance_id == "chat-1"
    assert config.server.shutdown_timeout == 3.0
    assert isinstance(config.server.shutdown_timeout, float)
    assert config.auth.jwt_algorithms == ("HS512", "RS256")
    assert config.auth.allowed_origins == ("https://a.example",)
    assert config.auth.require_record is True
    assert config.limits.max_message_bytes == 1024
    assert config.limits.send_rate == 2.5
    assert config.server.host == "127.0.0.1"  # untouched keys keep their defaults


def test_precedence_file_then_env_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nport = 9000\nhost = "0.0.0.0"\n[redis]\nurl = "redis://a"\n')
    env = {"TRIO_CHAT_SERVER_PORT": "9001", "TRIO_CHAT_REDIS_URL": "redis://b"}
    config = load_config(path, env=env)
    assert (config.server.port, config.server.host, config.redis.url) == (
        9001,
        "0.0.0.0",
        "redis://b",
    )
    config = load_config(path, env=env, overrides={"server": {"port": 9002}})
    assert (config.server.port, config.redis.url) == (9002, "redis://b")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        *((raw, True) for raw in ["true", "True", "1", "yes", "YES", "on", " on "]),
        *((raw, False) for raw in ["false", "FALSE", "0", "no", "off", "Off"]),
    ],
)
def test_env_bool(raw: str, expected: bool) -> None:
    config = load_config(env={"TRIO_CHAT_AUTH_REQUIRE_RECORD": raw})
    assert config.auth.require_record is expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("https://a.example,https://b.example", ("https://a.example", "https://b.example")),
        (" https://a.example , https://b.example ", ("https://a.example", "https://b.example")),
        ('["https://a.example", "https://b.example"]', ("https://a.example", "https://b.example")),
        ("https://a.example", ("https://a.example",)),
        ("", ()),
        ("[]", ()),
    ],
)
def test_env_list(raw: str, expected: tuple[str, ...]) -> None:
    config = load_config(env={"TRIO_CHAT_AUTH_ALLOWED_ORIGINS": raw})
    assert config.auth.allowed_origins == expected


def test_env_scalars() -> None:
    config = load_config(
        env={
            "TRIO_CHAT_LIMITS_MAX_MESSAGE_BYTES": "1024",
            "TRIO_CHAT_SESSION_TTL": "2.5",
            "TRIO_CHAT_SESSION_INSTANCE_TTL": "7",
            "TRIO_CHAT_AUTH_JWT_SECRET": SECRET,
            "TRIO_CHAT_SERVER_HOST": "0.0.0.0",
            "PATH": "/usr/bin",  # other variables are ignored
        }
    )
    assert config.limits.max_message_bytes == 1024
    assert config.session.ttl == 2.5
    assert config.session.instance_ttl == 7.0
    assert config.auth.jwt_secret == SECRET
    assert config.server.host == "0.0.0.0"


def test_overrides_are_typed() -> None:
    config = load_config(env={}, overrides={"admin": {"port": 0, "enabled": False}})
    assert (config.admin.port, config.admin.enabled) == (0, False)


def test_unknown_key_in_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 1\nbogus = 2\n")
    assert error_of(path, env={}) == f"config error: server.bogus: unknown key (in {path})"


def test_unknown_section_in_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[bogus]\n")
    assert error_of(path, env={}) == f"config error: bogus: unknown section (in {path})"


def test_section_must_be_a_table(tmp_path: Path) -> None:
    path = write(tmp_path, "server = 1\n")
    assert error_of(path, env={}).startswith("config error: server: expected a table")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("TRIO_CHAT_SERVER_BOGUS", "server.bogus: unknown key"),
        ("TRIO_CHAT_AUTH_JWT_SECERT", "auth.jwt_secert: unknown key (did you mean jwt_secret?)"),
        ("TRIO_CHAT_REDIS_URI", "redis.uri: unknown key (did you mean url?)"),
    ],
)
def test_unknown_key_of_a_section_in_env(name: str, message: str) -> None:
    assert error_of(env={name: "1"}) == f"config error: {message} (from {name})"


def test_typo_in_toml_names_the_closest_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\nsend_rat = 5\n")
    message = "limits.send_rat: unknown key (did you mean send_rate?)"
    assert error_of(path, env={}) == f"config error: {message} (in {path})"


def test_env_outside_every_section_is_ignored_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = {"TRIO_CHAT_BIN": "/usr/bin/trio-chat", "TRIO_CHAT_SERVER_PORT": "9000"}
    with caplog.at_level(logging.WARNING):
        config = load_config(env=env)
    assert config.server.port == 9000
    assert [r.getMessage() for r in caplog.records] == [
        "ignoring TRIO_CHAT_BIN: 'bin' is no configuration section "
        "(server, redis, auth, session, heartbeat, limits, history, admin, hooks)"
    ]


def test_unknown_key_in_overrides() -> None:
    message = error_of(env={}, overrides={"server": {"bogus": 1}})
    assert message == "config error: server.bogus: unknown key (from the command line)"


@pytest.mark.parametrize(
    ("toml", "key", "fragment"),
    [
        ("[server]\nport = 70000", "server.port", "65535"),
        ("[server]\nport = -1", "server.port", "-1"),
        ('[server]\nport = "80"', "server.port", "expected an integer, got '80'"),
        ("[limits]\nmax_message_bytes = 1.5", "limits.max_message_bytes", "got 1.5"),
        ("[limits]\nmax_message_bytes = true", "limits.max_message_bytes", "got True"),
        ("[session]\nttl = -1", "session.ttl", "> 0"),
        ("[session]\nttl = 0", "session.ttl", "> 0"),
        ('[session]\nttl = "60"', "session.ttl", "expected a number"),
        ('[admin]\nenabled = "yes"', "admin.enabled", "expected true or false, got 'yes'"),
        ("[admin]\nenabled = 1", "admin.enabled", "expected true or false, got 1"),
        ("[redis]\nurl = 5", "redis.url", "expected a string, got 5"),
        ('[auth]\njwt_algorithms = "HS256"', "auth.jwt_algorithms", "expected a list"),
        ('[auth]\njwt_algorithms = ["none"]', "auth.jwt_algorithms", "'none'"),
        ('[auth]\njwt_algorithms = ["HS256", "NONE"]', "auth.jwt_algorithms", "'NONE'"),
        ('[auth]\njwt_algorithms = ["HS1024"]', "auth.jwt_algorithms", "'HS1024'"),
        ("[auth]\njwt_algorithms = []", "auth.jwt_algorithms", ">= 1"),
        ('[server]\npath = "chat"', "server.path", "must start with '/'"),
        ("[auth]\nleeway = -1", "auth.leeway", ">= 0"),
    ],
)
def test_bad_toml_value_names_the_key(tmp_path: Path, toml: str, key: str, fragment: str) -> None:
    path = write(tmp_path, toml)
    message = error_of(path, env={})
    assert message.startswith(f"config error: {key}: ")
    assert message.endswith(f" (in {path})")
    assert fragment in message


def test_integral_float_is_accepted_for_an_int(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[limits]\nmax_message_bytes = 1024.0"), env={})
    assert config.limits.max_message_bytes == 1024
    assert isinstance(config.limits.max_message_bytes, int)


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        (
            "TRIO_CHAT_LIMITS_MAX_MESSAGE_BYTES",
            "abc",
            "limits.max_message_bytes: expected an integer, got 'abc'",
        ),
        ("TRIO_CHAT_LIMITS_MAX_MESSAGE_BYTES", "1.5", "expected an integer, got '1.5'"),
        ("TRIO_CHAT_SESSION_TTL", "soon", "session.ttl: expected a number, got 'soon'"),
        ("TRIO_CHAT_SESSION_TTL", "-5", "session.ttl: "),
        ("TRIO_CHAT_SERVER_PORT", "70000", "server.port: "),
        ("TRIO_CHAT_ADMIN_ENABLED", "maybe", "admin.enabled: expected true/false, yes/no"),
        ("TRIO_CHAT_AUTH_JWT_ALGORITHMS", "HS256,none", "auth.jwt_algorithms: "),
        ("TRIO_CHAT_AUTH_JWT_ALGORITHMS", '["HS256"', "auth.jwt_algorithms: expected a JSON"),
        ("TRIO_CHAT_AUTH_JWT_ALGORITHMS", "[1]", "auth.jwt_algorithms: expected a string"),
    ],
)
def test_bad_env_value_names_the_key_and_variable(name: str, raw: str, message: str) -> None:
    error = error_of(env={name: raw})
    assert error.startswith("config error: ")
    assert message in error
    assert error.endswith(f"(from {name})")


def test_bad_override_names_the_key() -> None:
    message = error_of(env={}, overrides={"server": {"port": 70000}})
    assert message.startswith("config error: server.port: ")
    assert message.endswith("(from the command line)")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    assert str(path) in error_of(path, env={})


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nport = 1")
    message = error_of(path, env={})
    assert message.startswith(f"config error: {path}: invalid TOML")


def test_no_secret_is_allowed_at_load_time() -> None:
    assert load_config(env={}).auth.jwt_secret is None


# The command line, run as the console script would be.


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_CHAT_")}
    return subprocess.run(
        [sys.executable, "-m", "trio_chat", *args],
        env={**clean, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_unknown_key_exits_2_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nbogus = 1\n")
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr == f"trio-chat: config error: server.bogus: unknown key (in {path})\n"


def test_cli_warns_once_of_a_variable_that_is_no_config_and_runs() -> None:
    env = {"TRIO_CHAT_BIN": "/opt/bin/trio-chat", "TRIO_CHAT_AUTH_JWT_SECRET": "s" * 32}
    result = run_cli("token", "alice", env=env)
    assert result.returncode == 0
    assert result.stdout.count(".") == 2  # a JWT
    [line] = result.stderr.splitlines()
    assert "ignoring TRIO_CHAT_BIN" in line


def test_cli_bad_env_exits_2() -> None:
    result = run_cli("serve", env={"TRIO_CHAT_SERVER_PORT": "abc"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "trio-chat: config error: server.port: expected an integer, got 'abc'"
        " (from TRIO_CHAT_SERVER_PORT)"
    ]


def test_cli_bad_flag_value_exits_2() -> None:
    result = run_cli("serve", "--port", "70000")
    assert result.returncode == 2
    assert result.stderr.startswith("trio-chat: config error: server.port: ")
    assert "Traceback" not in result.stderr


def test_cli_usage_error_exits_2() -> None:
    result = run_cli("serve", "--port", "abc")
    assert result.returncode == 2
    assert "invalid int value" in result.stderr


def test_cli_token() -> None:
    result = run_cli(
        "token",
        "alice",
        "--ttl",
        "60",
        "--rooms",
        "lobby",
        "team-*",
        env={"TRIO_CHAT_AUTH_JWT_SECRET": SECRET, "TRIO_CHAT_AUTH_AUDIENCE": "chat"},
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="chat")
    assert claims["sub"] == "alice"
    assert claims["exp"] - claims["iat"] == 60
    assert claims["rooms"] == ["lobby", "team-*"]
    assert "iss" not in claims


def test_cli_token_uses_the_first_hs_algorithm_and_the_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[auth]\njwt_algorithms = ["RS256", "HS384"]\nissuer = "me"\n')
    result = run_cli(
        "token", "bob", "--config", str(path), env={"TRIO_CHAT_AUTH_JWT_SECRET": SECRET * 2}
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert jwt.get_unverified_header(token)["alg"] == "HS384"
    claims = jwt.decode(token, SECRET * 2, algorithms=["HS384"], issuer="me")
    assert claims["sub"] == "bob"
    assert "rooms" not in claims


def test_cli_token_without_secret_exits_2() -> None:
    result = run_cli("token", "alice")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "trio-chat: config error: auth.jwt_secret: not set (TRIO_CHAT_AUTH_JWT_SECRET)"
    ]


def test_cli_token_carries_the_rooms_and_publish_claims() -> None:
    env = {"TRIO_CHAT_AUTH_JWT_SECRET": "s" * 32}
    result = run_cli("token", "bob", "--rooms", "talk-*", "news", "--publish", "talk-*", env=env)
    assert result.returncode == 0
    claims = jwt.decode(result.stdout.strip(), "s" * 32, algorithms=["HS256"])
    assert (claims["rooms"], claims["publish"]) == (["talk-*", "news"], ["talk-*"])
    silent = run_cli("token", "bob", "--publish", env=env)  # may post nowhere
    assert jwt.decode(silent.stdout.strip(), "s" * 32, algorithms=["HS256"])["publish"] == []


def test_trusted_proxies_are_networks() -> None:
    config = load_config(env={"TRIO_CHAT_SERVER_TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.1, ::1"})
    assert config.server.trusted_proxies == ("10.0.0.0/8", "192.0.2.1", "::1")
    message = error_of(env={"TRIO_CHAT_SERVER_TRUSTED_PROXIES": "10.0.0.0/8,proxy.local"})
    assert message.startswith("config error: server.trusted_proxies: ")
    assert "'proxy.local' is not a network" in message
