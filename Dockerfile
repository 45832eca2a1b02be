# One image per Warden service, each with only what that service imports: build with
# `--build-arg SERVICE=policy-gate` (or scheduler, agent-runner, audit-projector); compose.yaml
# builds all four. The project is installed as a wheel (not from the source tree), exactly as
# `pip install 'warden-control-plane[<service>]'` would, with the same locked versions.
FROM python:3.11-slim
ARG SERVICE
RUN test -n "$SERVICE" || (echo "build with --build-arg SERVICE=<policy-gate|scheduler|agent-runner|audit-projector>" && false)
ENV PYTHONUNBUFFERED=1 UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy
RUN pip install --no-cache-dir uv
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project --extra "$SERVICE"
COPY shared ./shared
COPY src ./src
COPY services ./services
COPY deploy ./deploy
COPY policies ./policies
COPY agents ./agents
RUN uv sync --frozen --no-dev --no-editable --extra "$SERVICE"
ENV PATH="/app/.venv/bin:$PATH" WARDEN_LOG_FORMAT=json
USER nobody
CMD ["warden", "--help"]
