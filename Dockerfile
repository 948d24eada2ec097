# syntax=docker/dockerfile:1
# The API image: `hsc serve` in broker mode (HSC_REDIS_URL set; workers from Dockerfile.gpu do the
# work). Python slim, no CUDA, no torch.
#
# The hsc package requires torch because the model and the workers need it, but the API process never
# imports torch (hsc.service imports only hsc.core and third-party packages; tests/test_layering.py
# checks it). So the package is installed with --no-deps, beside only the third-party packages that
# hsc.core and hsc.service import, with pyproject.toml's bounds (tests/test_deploy_files.py checks this
# list against their imports and against pyproject.toml). That keeps ~1 GB (CPU torch) to several GB
# (CUDA torch) out of the image. Without torch this image cannot run the embedded mode: compose sets
# HSC_REDIS_URL.
#
#   docker build -t hsc-api .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# the API's third-party packages (a layer of its own: rebuilt only when this list changes)
RUN pip install \
        "numpy>=1.24" \
        "pillow>=10" \
        "fastapi>=0.110" \
        "uvicorn[standard]>=0.29" \
        "python-multipart>=0.0.9" \
        "pydantic>=2.6" \
        "pydantic-settings>=2.7" \
        "celery[redis]>=5.4" \
        "redis>=5" \
        "prometheus-client>=0.20" \
        "httpx>=0.27"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY core core
COPY service service
COPY model model
COPY training training
COPY worker worker
# --no-deps: torch, pydensecrf2, safetensors, matplotlib and tqdm stay out (only model/, training/ and
# worker/ import them). The import check fails the build if the service ever needs one of them.
RUN pip install --no-deps . \
    && python -c "import sys, hsc.service.main; assert 'torch' not in sys.modules, 'the API imported torch'" \
    && hsc serve --help >/dev/null \
    && rm -rf /src

RUN useradd --create-home --uid 1000 hsc \
    && mkdir -p /data/results /data/datasets \
    && chown -R hsc:hsc /data
USER hsc
WORKDIR /data

ENV HSC_HOST=0.0.0.0 \
    HSC_PORT=8000 \
    HSC_RESULTS_DIR=/data/results
EXPOSE 8000
CMD ["hsc", "serve"]
