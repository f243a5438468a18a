# Graft in a container: the same `make` steps as the README, as a non-root user.
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends make curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 graft \
    && mkdir -p /data && chown graft:graft /data

WORKDIR /app
COPY --chown=graft:graft . .
USER graft

# State (SQLite, admin key) lives on a volume, or in PostgreSQL (GRAFT_DATABASE_URL);
# exported backbones stay in the image.
ENV GRAFT_DATA_DIR=/data \
    GRAFT_BACKBONE_DIR=/app/backbones \
    BENTOML_DO_NOT_TRACK=True \
    HF_HUB_OFFLINE=1 \
    PORT=3000 \
    HOST=0.0.0.0

# Install and export the backbones at build time, so the container starts offline.
RUN make prepare

# The GPU image (`docker build --build-arg GPU=1 -t graft:gpu .`, for
# deploy/kubernetes/gpu): onnxruntime's CUDA build with the CUDA and cuDNN libraries from
# pip, which models/runtime.py preloads.
ARG GPU=0
RUN if [ "$GPU" = 1 ]; then \
        .venv/bin/pip uninstall -y onnxruntime \
        && .venv/bin/pip install --no-cache-dir "onnxruntime-gpu[cuda,cudnn]"; \
    fi

VOLUME ["/data"]
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${PORT}/readyz" || exit 1
CMD ["make", "serve"]
