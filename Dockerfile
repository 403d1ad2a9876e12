# One image for the API and the workers (distributed mode; see docs/service.md).
FROM python:3.11-slim

# The CPU build by default; for GPU workers build with
#   --build-arg TORCH_SPEC="torch==2.13.0" --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir "${TORCH_SPEC}" --index-url "${TORCH_INDEX}"

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY dvemb ./dvemb
COPY server ./server
COPY worker ./worker
COPY migrations ./migrations
COPY demo ./demo
# The dashboard: index.html, style.css and the ES modules (no build step; node_modules is for linting only).
COPY frontend ./frontend
# huggingface: workers rebuild a transformers model from a replay bundle's config (docs/replay.md, "In the service").
RUN pip install --no-cache-dir ".[server,client,huggingface]"

ENV DVEMB_DATA_DIR=/data
EXPOSE 8000
CMD ["uvicorn", "server.main:app", "--host", "0.0.0.0", "--port", "8000"]
