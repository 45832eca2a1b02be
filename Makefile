# The README's two commands, `make demo` and `make test`, do all the set-up on a fresh machine:
# install uv if missing (from PyPI, with the machine's pip), create the environment on the
# machine's Python 3.11 from uv.lock (every dependency group, so the benchmarks are type-checked
# against their real dependencies), then run. No interpreter is downloaded.

UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)

.PHONY: setup demo up test lint schemas

setup:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen --all-groups --python 3.11 --no-python-downloads

demo: setup  ## the embedded stack with a demo: a run, a rejected command, the audit trail
	$(UV) run warden demo

up: setup  ## the embedded stack, until Ctrl-C
	$(UV) run warden up

test: setup  ## lint, types, and the whole suite on real NATS and Postgres
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run mypy
	$(UV) run pytest

schemas: setup  ## regenerate schemas/ and the README subject table after changing a message model
	$(UV) run python -m shared.contracts
