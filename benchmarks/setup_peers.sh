#!/usr/bin/env bash
# Build the chatglm.cpp peer for benchmarks/run_suite.py: PyPI's chatglm-cpp 0.4.2, compiled from source into its
# own virtual environment, so its build never touches the project's environment. Not run by CI.
#
#   bash benchmarks/setup_peers.sh [VENV]        # default VENV: ~/.cache/chatglm2-bench/chatglm-cpp-venv
#   PYTHON=.venv/bin/python bash benchmarks/setup_peers.sh   # the project's interpreter, if not python3
#   python -m benchmarks.run_suite --peer_python VENV/bin/python ...   (the default VENV needs no flag)
#
# Takes 4-8 minutes on 2 cores (ggml and the pybind11 module are compiled; no wheel exists for 0.4.2).
# The venv sees the project's packages: the GGML converter needs torch, sentencepiece and transformers' names,
# which the project already installs; only chatglm-cpp and its converter's tabulate go into the venv (tabulate only
# where the project lacks it). PYTHON (default python3) is the project's interpreter, a system Python or a venv's
# python alike: the venv is made from it without --system-site-packages (from a venv's python, that flag reaches
# the base interpreter's site-packages, not the project venv's), and a .pth file in the venv's site-packages lists
# the project interpreter's site-packages directories (site.getsitepackages(), the user site where enabled,
# sysconfig's purelib and platlib). A .pth appends to sys.path, so the venv's own packages come first and the
# project's after them; pip counts the project's as outside the venv (it never uninstalls them) and keeps them out
# of its isolated builds. Only those directories are listed: .pth files inside them (editable installs) are not
# followed. SETUP_PEERS_SKIP_BUILD=1 stops once the venv is made and wired (nothing installed, nothing compiled);
# benchmarks/test_setup_peers.sh uses it to check the wiring with a system Python and with a venv's python.
# ggml is compiled for this CPU (-march=native), so that the peer runs as well as this machine allows; set
# CHATGLM_CPP_CMAKE_ARGS to other CMake options (or to "" for chatglm-cpp's own defaults) if you prefer.
set -euo pipefail

VENV=${1:-${CHATGLM_CPP_VENV:-$HOME/.cache/chatglm2-bench/chatglm-cpp-venv}}
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)

"$PYTHON" -c "import torch, sentencepiece" 2>/dev/null || {
  echo "error: $PYTHON cannot import torch and sentencepiece; set PYTHON to the project's interpreter" \
    "or install the project's requirements.txt first" >&2; exit 2; }

# On Linux, ggml's CMake enables AVX2 at most; -march=native lets it use whatever this CPU has (AVX-512 included).
CHATGLM_CPP_CMAKE_ARGS=${CHATGLM_CPP_CMAKE_ARGS--DCMAKE_C_FLAGS=-march=native -DCMAKE_CXX_FLAGS=-march=native}
echo "ggml CMake options:${CHATGLM_CPP_CMAKE_ARGS:- (defaults)}"

"$PYTHON" -m venv "$VENV"
# The project interpreter's site-packages directories, in its own order, one a line, each once.
PROJECT_SITES=$("$PYTHON" -c '
import os, site, sysconfig
dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
dirs += [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
seen = set()
for d in map(os.path.abspath, dirs):
    if os.path.isdir(d) and "\n" not in d and os.path.normcase(d) not in seen:
        seen.add(os.path.normcase(d))
        print(d)
')
PEER_SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
printf '%s\n' "# written by benchmarks/setup_peers.sh: the site-packages of $PYTHON" "$PROJECT_SITES" \
  > "$PEER_SITE/chatglm2_project_site.pth"
echo "peer venv sees the site-packages of $PYTHON: ${PROJECT_SITES//$'\n'/ }"
if [[ ${SETUP_PEERS_SKIP_BUILD:-0} == 1 ]]; then
  echo "SETUP_PEERS_SKIP_BUILD=1: venv made and wired, nothing installed or built: $VENV/bin/python"; exit 0
fi

"$VENV/bin/python" -m pip install --quiet tabulate
# chatglm.cpp's CMakeLists asks for a CMake policy version that CMake 4 dropped; the minimum override lets it build.
CMAKE_ARGS="$CHATGLM_CPP_CMAKE_ARGS" CMAKE_POLICY_VERSION_MINIMUM=3.5 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  "$VENV/bin/python" -m pip install --no-binary chatglm-cpp --no-cache-dir "chatglm-cpp==0.4.2"
# The thread-count shim (see hardware_concurrency.c); run_suite.py preloads it when it is there.
cc -O2 -shared -fPIC -o "$VENV/lib/libhardware_concurrency.so" "$HERE/hardware_concurrency.c"
"$VENV/bin/python" -c "import chatglm_cpp, chatglm_cpp.convert; print('chatglm-cpp', chatglm_cpp.__version__, 'ready')"
echo "peer python: $VENV/bin/python"
