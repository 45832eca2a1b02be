# The README's two commands, `make demo` and `make test`, do all the set-up on a fresh machine:
# install uv if missing (from PyPI, with the machine's pip), create the environment on the
# machine's Python 3.11 from uv.lock, then run. No interpreter is downloaded. `make demo` and
# `make up` install only what Warden runs on; `make test` adds every dependency group (the test
# tools, and the benchmarks' dependencies, so the benchmarks are type-checked against them).

UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)
UV_SYNC := $(UV) sync --frozen --python 3.11 --no-python-downloads

.PHONY: uv setup setup-runtime demo up test lint schemas

uv:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv

setup: uv
	$(UV_SYNC) --all-groups --extra stack

# --inexact: what `make test` installed stays; a fresh machine gets Warden's own dependencies only.
setup-runtime: uv
	$(UV_SYNC) --no-dev --inexact --extra stack

demo: setup-runtime  ## the embedded stack with a demo: a governed run, a denied one, their audit trail
	$(UV) run --no-sync warden demo

up: setup-runtime  ## the embedded stack, until Ctrl-C
	$(UV) run --no-sync warden up

test: setup  ## lint, types, and the whole suite on real NATS and Postgres
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run mypy
	$(UV) run pytest

schemas: setup  ## regenerate schemas/ (JSON Schemas, AsyncAPI) and the README subject table after changing a model
	$(UV) run python -m schemas.generate
