# xdecoder-ls: the X-Decoder ML backend for Label Studio.
#   docker build -t xdecoder-ls .                                   (CPU)
#   docker build -t xdecoder-ls --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   (GPU)
#   docker run -p 9090:9090 -v xdls:/data -e LABEL_STUDIO_URL=... -e LABEL_STUDIO_API_KEY=... xdecoder-ls
# The same image runs workers: docker run -v xdls:/data ... xdecoder-ls xdecoder-ls worker
# (share /data, or set REDIS_URL, so server and workers see the same Redis and model versions).
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
COPY bench ./bench
RUN pip install .

VOLUME /data
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/health', timeout=2)"
CMD ["xdecoder-ls", "serve", "--host", "0.0.0.0", "--port", "9090"]
