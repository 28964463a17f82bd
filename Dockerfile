# cipherbert API server (one replica). Build: docker build -t cipherbert .
# Run one process:  docker run -p 8000:8000 -e CIPHERBERT_API_KEYS=tenant:key -v cb-data:/data cipherbert
# Replicas + redis + nginx: docker compose up (docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1

WORKDIR /app

# CPU-only torch, pinned, from the PyTorch CPU wheel index: the default PyPI wheel pulls the CUDA
# stack (several GB) that a CPU server never uses. The server itself only needs torch for training
# tools (distill, dp-finetune) and the load test's plaintext reference; the engine and SDK do not.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

# Dependencies first (cached layer), then the code. torch==2.13.0 is already satisfied above.
COPY pyproject.toml README.md ./
COPY cipherbert/ cipherbert/
COPY he_models/ he_models/
COPY service/ service/
COPY clients/ clients/
COPY distill/ distill/
COPY dp_training/ dp_training/
# Editable install: the code stays in /app (training configs and models resolve relative to it).
RUN pip install -e . && python -c "import tenseal, fastapi, uvicorn, redis, service.app, clients.sdk; print('deps ok')"

# The shipped model(s). The engine caches derived files under models/<id>/.cache, so the service user
# owns this directory.
COPY models/ /app/models/

RUN useradd --system --uid 10001 --home-dir /data cipherbert \
    && mkdir -p /data && chown -R cipherbert /data /app/models
USER cipherbert

ENV CIPHERBERT_DATA_DIR=/data \
    CIPHERBERT_MODELS_DIR=/app/models \
    CIPHERBERT_WORKERS=2
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status == 200 else 1)"

# API keys: CIPHERBERT_API_KEYS=tenant:key,... or --api-keys FILE; replicas also need the same
# CIPHERBERT_SECRET and CIPHERBERT_REDIS_URL (see docker-compose.yml and docs/service.md).
CMD ["cipherbert", "serve", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]
