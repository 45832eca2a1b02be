# One image for every Warden service; compose.yaml picks the service with the command.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy
RUN pip install --no-cache-dir uv
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY shared ./shared
COPY services ./services
COPY warden ./warden
COPY deploy ./deploy
COPY policies ./policies
COPY agents ./agents
RUN uv sync --frozen --no-dev
ENV PATH="/app/.venv/bin:$PATH" WARDEN_LOG_FORMAT=json
USER nobody
CMD ["warden", "--help"]
