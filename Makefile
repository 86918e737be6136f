# Two entry points for a fresh machine: `make run` and `make test`.
# Both create the virtualenv and install what they need; running them again is cheap.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test lint typecheck check redis-server clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# A development secret unless one is configured; never use it in production.
run: export TRIO_CHAT_AUTH_JWT_SECRET ?= dev-secret-change-me
run: $(STAMP)
	@echo "mint a token:  TRIO_CHAT_AUTH_JWT_SECRET=$$TRIO_CHAT_AUTH_JWT_SECRET $(BIN)/trio-chat token alice"
	$(BIN)/trio-chat serve $(ARGS)

# The tests start their own redis-server on a free port; install Debian's when missing.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "redis-server not found: installing Debian's redis-server"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

test: $(STAMP) redis-server
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check trio_chat tests
	$(BIN)/ruff format --check trio_chat tests

typecheck: $(STAMP)
	$(BIN)/mypy trio_chat

check: lint typecheck test

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
