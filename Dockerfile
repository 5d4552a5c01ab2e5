# xdecoder-ls: the X-Decoder ML backend for Label Studio.
#   docker build -t xdecoder-ls .                                   (CPU)
#   docker build -t xdecoder-ls --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   (GPU)
#   docker run -p 9090:9090 -v xdls:/data -e LABEL_STUDIO_URL=... -e LABEL_STUDIO_API_KEY=... xdecoder-ls
#   (GPU: add --gpus all, or --gpus device=1 for one GPU per container)
# The same image runs workers: docker run --no-healthcheck -v xdls:/data ... xdecoder-ls xdecoder-ls worker
# (share /data, or set REDIS_URL, so server and workers see the same Redis and model versions; the health check
# asks the server's port, which a worker does not serve). Runs as the unprivileged user "xdls", who owns /data.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MODEL_DIR=/data \
    HF_HOME=/data/huggingface \
    THP_MEM_ALLOC_ENABLE=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# torch first, from the chosen index: a plain resolver would pull the multi-GB CUDA build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

COPY pyproject.toml README.md ./
COPY xdecoder ./xdecoder
COPY backend ./backend
COPY label_config ./label_config
RUN pip install .

RUN useradd --create-home --uid 1000 xdls && mkdir -p /data && chown xdls /data
USER xdls
VOLUME /data
EXPOSE 9090
# The first start downloads the checkpoint (about 1 GB) before the server listens: give it time.
HEALTHCHECK --interval=30s --timeout=3s --start-period=600s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/health', timeout=2)"
CMD ["xdecoder-ls", "serve", "--host", "0.0.0.0", "--port", "9090"]
