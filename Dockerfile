# xdecoder-ls: the X-Decoder ML backend for Label Studio. docker-compose.yml runs it with Label Studio, Redis and a
# worker (docs/deploy.md); alone:
#   docker build -t xdecoder-ls .                                   (CPU)
#   docker build -t xdecoder-ls --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   (GPU)
#   docker run -p 9090:9090 -v xdls:/data -e LABEL_STUDIO_URL=... -e LABEL_STUDIO_API_KEY=... xdecoder-ls
#   (GPU: add --gpus all, or --gpus device=1 for one GPU per container)
# The same image runs workers: docker run -v xdls:/data ... xdecoder-ls xdecoder-ls worker
# (share /data, or set REDIS_URL, so server and workers see the same Redis, model versions and Hub cache).
# Runs as the unprivileged user "xdls", who owns /data.
FROM python:3.11-slim-bookworm

# MALLOC_*: what xdecoder-ls sets at process start anyway (backend/memory.py), said here for every process of the
# image: two malloc arenas and a fixed 1 MiB mmap threshold keep the server's memory flat under concurrent requests.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MODEL_DIR=/data \
    HF_HOME=/data/huggingface \
    THP_MEM_ALLOC_ENABLE=1 \
    MALLOC_ARENA_MAX=2 \
    MALLOC_MMAP_THRESHOLD_=1048576

RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1=12.2.* \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# torch first, from the chosen index: a plain resolver would pull the multi-GB CUDA build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# The lock first: every other dependency at the version the tests ran with, and a layer that outlives code changes.
COPY locks ./locks
COPY pyproject.toml README.md ./
COPY xdecoder ./xdecoder
COPY backend ./backend
COPY label_config ./label_config
RUN pip install -c locks/product.txt .

RUN useradd --create-home --uid 1000 xdls && mkdir -p /data && chown xdls /data
USER 1000
VOLUME /data
EXPOSE 9090
# Unhealthy, with the reason in `docker inspect`, until the server answers and Label Studio accepts the API key; the
# first start downloads the checkpoint (about 1 GB) before the server listens, so give it time. Workers, which
# serve no port, check with `python -m backend.preflight` alone (docker-compose.yml).
HEALTHCHECK --interval=30s --timeout=15s --start-period=600s \
    CMD ["python", "-m", "backend.preflight", "--server", "http://127.0.0.1:9090"]
# The preflight logs what is missing (API key, Label Studio, Redis) as one line at start, then runs the command.
ENTRYPOINT ["python", "-m", "backend.preflight", "--then"]
CMD ["xdecoder-ls", "serve", "--host", "0.0.0.0", "--port", "9090"]
