# Two entry points for a fresh machine: `make run` and `make test`.
# Both create the virtualenv and install what they need; running them again is cheap.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test lint typecheck check redis-server chromium systemd-analyze prometheus nginx clean bench soak

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Development secrets unless configured; never use them in production.
run: export TRIO_CHAT_AUTH_JWT_SECRET ?= dev-secret-change-me-at-least-32-bytes
run: export TRIO_CHAT_ADMIN_API_KEY ?= dev-admin-key-change-me
run: export TRIO_CHAT_ADMIN_DEMO ?= true
run: $(STAMP)
	@echo "trio-chat on ws://127.0.0.1:8765/ (memory store)."
	@echo "  demo chat page:  http://127.0.0.1:8766/demo/"
	@echo "  dashboard:       http://127.0.0.1:8766/   (admin key: $$TRIO_CHAT_ADMIN_API_KEY)"
	@echo "In another terminal, chat as alice:"
	@echo "  TRIO_CHAT_AUTH_JWT_SECRET=$$TRIO_CHAT_AUTH_JWT_SECRET $(BIN)/trio-chat client ws://127.0.0.1:8765/ --user alice"
	@echo "or mint a token for any client:  TRIO_CHAT_AUTH_JWT_SECRET=$$TRIO_CHAT_AUTH_JWT_SECRET $(BIN)/trio-chat token alice"
	$(BIN)/trio-chat serve --config config/demo.toml $(ARGS)

# The tests start their own redis-server on a free port; install Debian's when missing.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "redis-server not found: installing Debian's redis-server"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

# The browser tests drive Debian's chromium with playwright (never `playwright install`).
chromium:
	@test -x /usr/bin/chromium || { \
	  echo "chromium not found: installing Debian's chromium"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# tests/test_systemd.py checks the unit file with `systemd-analyze verify` (Debian's systemd).
systemd-analyze:
	@command -v systemd-analyze >/dev/null 2>&1 || { \
	  echo "systemd-analyze not found: installing Debian's systemd"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd; }

# tests/test_prometheus.py checks config/prometheus with promtool and scrapes two instances
# with a real Prometheus (Debian's prometheus brings both).
prometheus:
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || { \
	  echo "prometheus not found: installing Debian's prometheus"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

# tests/test_nginx.py runs Debian's nginx with config/nginx/trio-chat.conf.
nginx:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
	  echo "nginx not found: installing Debian's nginx"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx; }

test: $(STAMP) redis-server chromium systemd-analyze prometheus nginx
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check trio_chat tests
	$(BIN)/ruff format --check trio_chat tests

typecheck: $(STAMP)
	$(BIN)/mypy trio_chat

check: lint typecheck test

# bench/run.py: trio-chat vs python-socketio and Node.js Socket.IO under the same Node.js load
# generator. The python peer and py-spy go into bench/.venv, the generator's packages into
# bench/loadgen/node_modules, the Node peer's into bench/peers/socketio-node/node_modules; none
# touches the project's .venv. `make bench ARGS=--quick`.
BENCH_VENV  = bench/.venv
BENCH_STAMP = $(BENCH_VENV)/.installed
LOADGEN_STAMP = bench/loadgen/node_modules/.installed
NODE_PEER_STAMP = bench/peers/socketio-node/node_modules/.installed

$(BENCH_STAMP): bench/requirements.txt
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet -r bench/requirements.txt
	touch $(BENCH_STAMP)

$(LOADGEN_STAMP): bench/loadgen/package.json bench/loadgen/package-lock.json
	cd bench/loadgen && npm ci --no-audit --no-fund
	touch $(LOADGEN_STAMP)

$(NODE_PEER_STAMP): bench/peers/socketio-node/package.json bench/peers/socketio-node/package-lock.json
	cd bench/peers/socketio-node && npm ci --no-audit --no-fund
	touch $(NODE_PEER_STAMP)

bench: $(STAMP) redis-server $(BENCH_STAMP) $(LOADGEN_STAMP) $(NODE_PEER_STAMP)
	$(PYTHON) bench/run.py $(ARGS)

# bench/soak.py: chat for N minutes under instance kills and drains, Redis pauses and restarts,
# socket resets, logouts and bans (and, as root, --netem), then checks that nothing acknowledged
# was lost, nothing came twice and nothing leaked. `make soak ARGS="--minutes 30"`.
soak: $(STAMP) redis-server
	$(BIN)/python bench/soak.py $(or $(ARGS),--minutes 10)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
