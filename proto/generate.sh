#!/usr/bin/env bash
# Regenerate the Python code of the wire contract next to the .proto file.
# grpcio-tools must match grpcio (pinned together in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")"
python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. loraquilt/v1/loraquilt.proto
