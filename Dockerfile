# syntax=docker/dockerfile:1
#
# pdsidecar images (multi-stage):
#   --target sidecar : slim P/D sidecar + admission webhook (python slim, no torch/vLLM)
#   --target engine  : official vLLM image + pdsidecar (so vLLM can import
#                      transfer.connector:PdConnector) + NIXL
#
#   docker build --target sidecar -t ghcr.io/pdsidecar/pdsidecar:0.1.0 .
#   docker build --target engine  -t ghcr.io/pdsidecar/vllm-pd:0.32.0-0.1.0 .
#
# Base images are pinned by tag; pin by digest (@sha256:...) in your registry mirror.

ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

# --------------------------------------------------------------------------- #
# Build the pdsidecar wheel (pure Python; no compiler needed).
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pdsidecar ./pdsidecar
COPY transfer ./transfer
COPY proxy ./proxy
COPY bench ./bench
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --------------------------------------------------------------------------- #
# Sidecar virtualenv: pinned runtime requirements + our wheel (no NIXL, no torch).
FROM ${PYTHON_IMAGE} AS sidecar-venv
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY deploy/docker/requirements-sidecar.txt /tmp/requirements-sidecar.txt
RUN python -m venv /opt/pdsidecar \
 && /opt/pdsidecar/bin/pip install --no-cache-dir --only-binary=:all: -r /tmp/requirements-sidecar.txt
COPY --from=wheel /wheels /wheels
RUN /opt/pdsidecar/bin/pip install --no-cache-dir --no-deps /wheels/pdsidecar-0.1.0-py3-none-any.whl

# --------------------------------------------------------------------------- #
FROM ${PYTHON_IMAGE} AS sidecar
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="pdsidecar" \
      org.opencontainers.image.description="Prefill/decode disaggregation sidecar and admission webhook for vLLM" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/pdsidecar/pdsidecar" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.12.11-slim-bookworm"
RUN groupadd --system --gid 10001 pdsidecar \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin pdsidecar
COPY --from=sidecar-venv /opt/pdsidecar /opt/pdsidecar
ENV PATH=/opt/pdsidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PDSIDECAR_PORT=8000 \
    PDSIDECAR_METRICS_PORT=9090 \
    PDSIDECAR_VLLM_URL=http://127.0.0.1:8200
USER 10001:10001
EXPOSE 8000 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os,sys,urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PDSIDECAR_PORT', '8000'), timeout=2).status == 200 else 1)"]
ENTRYPOINT ["pdsidecar"]
CMD ["run", "--role", "decode"]

# --------------------------------------------------------------------------- #
# vLLM engine with our connector (transfer.connector:PdConnector) importable.
FROM ${VLLM_IMAGE} AS engine
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="vllm-pd" \
      org.opencontainers.image.description="vLLM with the pdsidecar KV connector (PdConnector) and NIXL" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/pdsidecar/pdsidecar" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/vllm/vllm-openai:v0.32.0"
COPY --from=wheel /wheels /tmp/wheels
# NIXL: the meta package wants both CUDA flavours, so install the cu12 build
# and then the meta package without dependencies. Our wheel's other
# dependencies (aiohttp, grpcio, protobuf, ...) are resolved against what the
# vLLM image already has.
RUN python3 -m pip install --no-cache-dir "nixl-cu12==1.5.1" \
 && python3 -m pip install --no-cache-dir --no-deps "nixl==1.5.1" \
 && python3 -m pip install --no-cache-dir /tmp/wheels/pdsidecar-0.1.0-py3-none-any.whl \
 && rm -rf /tmp/wheels \
 && python3 -c "import transfer, pdsidecar" \
 && groupadd --system --gid 10001 vllm \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/vllm --shell /usr/sbin/nologin vllm
ENV HF_HOME=/home/vllm/.cache/huggingface \
    VLLM_PORT_HEALTH=8200
WORKDIR /home/vllm
USER 10001:10001
EXPOSE 8200 14600
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python3", "-c", "import os,sys,urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('VLLM_PORT_HEALTH', '8200'), timeout=4).status == 200 else 1)"]
# The official image's entrypoint (`vllm serve`) is kept: pass the model and flags as args.
