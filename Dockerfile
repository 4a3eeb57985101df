# loraquilt server image, two targets:
#   CUDA (default):  docker build -t loraquilt .                      (or --target cuda)
#   CPU:             docker build -t loraquilt:cpu --target cpu .
#   With Ray Serve (deploy/, `loraquilt serve-ray`): add --build-arg EXTRAS=ray
# Run: docker run --gpus all -p 50051:50051 -p 8000:8000 -p 9464:9464 -v $PWD/adapters:/adapters loraquilt
#      docker run -p 50051:50051 -p 8000:8000 -p 9464:9464 -v $PWD/adapters:/adapters loraquilt:cpu
#
# Build arguments:
#   CPU_BASE, CUDA_BASE  the base image of each target. Any base with python3 >= 3.11 and its
#                        venv module works for cpu (a C compiler is installed with apt when
#                        missing); CUDA_BASE must be Ubuntu/Debian (python3 comes from apt).
#   EXTRAS, WITHOUT      optional dependency groups added (e.g. ray) and dependencies left
#                        out (cpu: triton, which only GPU code uses).
#   TORCH_INDEX_URL      cpu: an index with CPU torch wheels, searched besides pip's index
#                        (empty: pip's own sources only, e.g. a find-links folder holding one).
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_TRUSTED_HOST, PIP_CERT
#                        pip's own settings for the install steps (mirrors, offline wheel
#                        folders mounted into the build); they are not kept in the image.
# deploy/docker/build_local.py builds the cpu target with podman where no image registry is reachable.
ARG CPU_BASE=python:3.11-slim
ARG CUDA_BASE=nvidia/cuda:13.0.0-base-ubuntu24.04

# The project's files, listed once for both targets.
FROM scratch AS source
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cli ./cli
COPY kernels ./kernels
COPY server ./server
COPY client ./client
COPY proto ./proto
COPY bench ./bench
COPY train ./train
COPY scaleout ./scaleout

# ---------------------------------------------------------------------------------------------
FROM ${CPU_BASE} AS cpu-system
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LORAQUILT_CACHE=/var/cache/loraquilt \
    PATH=/opt/venv/bin:${PATH}
# A C compiler builds the project's native CPU kernels (at image build, kept in the cache).
RUN if ! command -v cc >/dev/null; then \
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY deploy/docker/install.sh /usr/local/lib/loraquilt/install.sh

# The dependency list alone, read from pyproject.toml: the layers that install it are reused
# until a dependency changes, whatever else changes in the project.
FROM cpu-system AS cpu-requirements
ARG EXTRAS=""
ARG WITHOUT=triton
COPY --from=source /src/pyproject.toml /tmp/pyproject.toml
RUN sh /usr/local/lib/loraquilt/install.sh requirements /tmp/pyproject.toml > /requirements.txt

FROM cpu-system AS cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_FIND_LINKS=""
ARG PIP_TRUSTED_HOST=""
ARG PIP_CERT=""
COPY --from=cpu-requirements /requirements.txt /opt/loraquilt-requirements.txt
RUN sh /usr/local/lib/loraquilt/install.sh deps /opt/loraquilt-requirements.txt
COPY --from=source /src /opt/loraquilt
RUN sh /usr/local/lib/loraquilt/install.sh app /opt/loraquilt
RUN mkdir -p /adapters
VOLUME ["/adapters"]
EXPOSE 50051 8000 9464
STOPSIGNAL SIGTERM
ENTRYPOINT ["loraquilt", "serve", "--host", "0.0.0.0", "--adapter-root", "/adapters"]

# ---------------------------------------------------------------------------------------------
# torch 2.13.0 from PyPI is a CUDA 13.0 build that carries its CUDA libraries; the base adds
# the driver hooks of the NVIDIA container toolkit.
FROM ${CUDA_BASE} AS cuda-system
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LORAQUILT_CACHE=/var/cache/loraquilt \
    PATH=/opt/venv/bin:${PATH}
# python3-dev and gcc: Triton compiles its launcher against Python.h at first use.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY deploy/docker/install.sh /usr/local/lib/loraquilt/install.sh

FROM cuda-system AS cuda-requirements
ARG EXTRAS=""
ARG WITHOUT=""
COPY --from=source /src/pyproject.toml /tmp/pyproject.toml
RUN sh /usr/local/lib/loraquilt/install.sh requirements /tmp/pyproject.toml > /requirements.txt

FROM cuda-system AS cuda
ARG TORCH_INDEX_URL=""
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_FIND_LINKS=""
ARG PIP_TRUSTED_HOST=""
ARG PIP_CERT=""
COPY --from=cuda-requirements /requirements.txt /opt/loraquilt-requirements.txt
RUN sh /usr/local/lib/loraquilt/install.sh deps /opt/loraquilt-requirements.txt
COPY --from=source /src /opt/loraquilt
RUN sh /usr/local/lib/loraquilt/install.sh app /opt/loraquilt
RUN mkdir -p /adapters
VOLUME ["/adapters"]
EXPOSE 50051 8000 9464
STOPSIGNAL SIGTERM
ENTRYPOINT ["loraquilt", "serve", "--host", "0.0.0.0", "--adapter-root", "/adapters"]
