# covid-cxr: one image for every role (ingest, worker, beat, migrate); the command picks the role.
#   docker build -t covid-cxr .                         the CPU image (the last stage below)
#   docker build --target cuda -t covid-cxr:cuda .      the same plus CUDA, for GPU workers
# See docs/operations.md (GPU readiness) and docker-compose.yml's gpu profile.
FROM python:3.11-slim AS cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    COVID_CXR_DATA_DIR=/data \
    COVID_CXR_INBOX_DIR=/inbox

WORKDIR /app
COPY pyproject.toml README.md ./
COPY covid_cxr covid_cxr
COPY ingest ingest
COPY worker worker
COPY db db
COPY model_store model_store
COPY taskqueue taskqueue
COPY delivery delivery
COPY web web
COPY service service
RUN pip install . \
 && useradd --create-home --uid 10001 covid \
 && mkdir -p /data /inbox \
 && chown covid:covid /data /inbox

# Celery refuses to be comfortable as root, and nothing here needs it.
USER covid
VOLUME ["/data", "/inbox"]
ENTRYPOINT ["covid-cxr"]
CMD ["--help"]

# GPU workers: the CPU image plus TensorFlow's CUDA and cuDNN libraries as pip wheels
# (tensorflow[and-cuda], pinned to the TensorFlow version already installed). The host needs only
# an NVIDIA driver and the NVIDIA container toolkit; the compose profile `gpu` reserves the device.
FROM cpu AS cuda
USER root
RUN pip install "tensorflow[and-cuda]==$(python -c 'from importlib.metadata import version; print(version("tensorflow"))')"
USER covid

# The last stage is what `docker build .` (and compose's plain `build: .`) makes: the CPU image.
FROM cpu AS runtime
