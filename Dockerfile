# covid-cxr: one image for every role (ingest, worker, beat, migrate); the command picks the role.
# CPU image. For an NVIDIA GPU worker build FROM a CUDA base and install tensorflow[and-cuda]
# instead (see docs/operate.md), or run the worker outside Docker.
FROM python:3.11-slim

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
