# syntax=docker/dockerfile:1
#
# Two images from one file (see docs/deploy.md):
#   docker build --target gateway -t batchwire/gateway .   # slim Python, no torch
#   docker build --target worker  -t batchwire/worker  .   # CUDA PyTorch + transformers
# Both run `batchwire ...` as a non-root user (uid 10001) and carry a HEALTHCHECK.

# The worker's base must already hold a CUDA torch >= 2.1 (setup.cfg, worker extra): the
# install below is constrained to it, so pip never swaps in a second multi-GB torch.
ARG PYTHON_IMAGE=python:3.11-slim
ARG TORCH_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# --- wheel: batchwire itself, built once and installed by both targets -------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY protocol ./protocol
COPY gateway ./gateway
COPY worker ./worker
# --no-deps: only batchwire's own pure-Python wheel; each target resolves its own deps.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- gateway: aiohttp + ZeroMQ only; never torch or transformers -------------------------
FROM ${PYTHON_IMAGE} AS gateway
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheel /wheels /wheels
# The bare package: install_requires has no torch, and no extra is named here.
RUN pip install /wheels/batchwire-*.whl \
    && rm -rf /wheels \
    && groupadd --gid 10001 batchwire \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin batchwire
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/batchwire
EXPOSE 8000 5555
# slim has no curl: python's urllib asks /health (open even when --api-key is set).
# It asks $BATCHWIRE_PORT, the port the gateway listens on when no --port is given, over
# HTTPS when $BATCHWIRE_TLS_CERT is set: set both that way (the CMD below passes no --port)
# and the probe follows them. It does not verify the certificate, which names the public
# host, not this loopback.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request; tls = os.environ.get('BATCHWIRE_TLS_CERT', '').strip(); ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE; urllib.request.urlopen('%s://127.0.0.1:%s/health' % ('https' if tls else 'http', os.environ.get('BATCHWIRE_PORT', '8000')), timeout=2, context=ctx)"]
ENTRYPOINT ["batchwire"]
# 0.0.0.0: a container's loopback is its own; --zmq-bind tcp://0.0.0.0 lets workers in other
# containers connect (publish 5555 only on a network you trust, or with CURVE keys:
# docs/deploy.md, "CURVE keys").
CMD ["gateway", "--host", "0.0.0.0", "--zmq-bind", "tcp://0.0.0.0:5555"]

# --- worker: one model process per GPU ---------------------------------------------------
FROM ${TORCH_IMAGE} AS worker
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models
COPY --from=wheel /wheels /wheels
# Pin torch to the version pip sees installed in the base image (its dist metadata, e.g.
# 2.5.1+cu124), then install the worker extra under that constraint: the resolver keeps the
# image's CUDA torch or fails, it never replaces it.
RUN python -c "from importlib.metadata import version; print('torch==' + version('torch'))" \
        > /tmp/torch-constraint.txt \
    && pip install --constraint /tmp/torch-constraint.txt "$(ls /wheels/batchwire-*.whl)[worker]" \
    && python -c "import torch, transformers; print(torch.__version__, transformers.__version__)" \
    && rm -rf /wheels /tmp/torch-constraint.txt \
    && groupadd --gid 10001 batchwire \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin batchwire \
    && mkdir -p /models \
    && chown 10001:10001 /models
# The Hugging Face cache (HF_HOME): mount a named volume or a PVC here so a model is
# downloaded once, not on every start. A fresh named volume takes this directory's owner.
VOLUME /models
USER 10001:10001
WORKDIR /home/batchwire
# A worker has no HTTP port. It is healthy while its process runs and is not stopped: a
# batch stuck past --batch-timeout-s makes it exit, and a lost gateway makes it re-announce
# itself, not die. PID 1 is `batchwire worker ...` (`batchwire serve` when this image runs
# gateway and workers together; docker-init in front of either with `init: true`).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys; cmd = open('/proc/1/cmdline', 'rb').read(); state = open('/proc/1/stat').read().rsplit(')', 1)[1].split()[0]; sys.exit(0 if b'batchwire' in cmd and state not in 'TtZ' else 1)"]
ENTRYPOINT ["batchwire"]
# The gateway endpoint comes from --connect or BATCHWIRE_CONNECT; without either the worker
# exits at once saying so.
CMD ["worker"]
