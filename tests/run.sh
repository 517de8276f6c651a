#!/usr/bin/env bash
# The README's test command: install whatever is missing, then run the tests. Extra arguments go to pytest, e.g.
#   bash tests/run.sh -m "not slow"     # the quick check (under a minute)
# torch is installed only when absent (the CPU wheel, so that nothing pulls the CUDA build); on a GPU or NPU host
# install your platform's torch first. Debian's chromium (for the web demo's browser tests) needs root or sudo.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
pip_install() { "$PYTHON" -m pip install -q --disable-pip-version-check "$@"; }

"$PYTHON" -c "import torch" 2>/dev/null || pip_install torch==2.13.0
pip_install -r requirements.txt -r requirements-dev.txt
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo "sudo")
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends chromium
fi
exec "$PYTHON" -m pytest -q tests "$@"
