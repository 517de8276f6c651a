#!/usr/bin/env bash
# Build the chatglm.cpp peer for benchmarks/run_suite.py: PyPI's chatglm-cpp 0.4.2, compiled from source into its
# own virtual environment, so its build never touches the project's environment. Not run by CI.
#
#   bash benchmarks/setup_peers.sh [VENV]        # default VENV: ~/.cache/chatglm2-bench/chatglm-cpp-venv
#   python -m benchmarks.run_suite --peer_python VENV/bin/python ...   (the default VENV needs no flag)
#
# Takes 4-8 minutes on 2 cores (ggml and the pybind11 module are compiled; no wheel exists for 0.4.2).
# The venv sees the system site-packages: the GGML converter needs torch, sentencepiece and transformers' names,
# which the project already installs; only chatglm-cpp and its converter's tabulate go into the venv.
# ggml is compiled for this CPU (-march=native), so that the peer runs as well as this machine allows; set
# CHATGLM_CPP_CMAKE_ARGS to other CMake options (or to "" for chatglm-cpp's own defaults) if you prefer.
set -euo pipefail

VENV=${1:-${CHATGLM_CPP_VENV:-$HOME/.cache/chatglm2-bench/chatglm-cpp-venv}}
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)

"$PYTHON" -c "import torch, sentencepiece" 2>/dev/null || {
  echo "error: $PYTHON lacks torch or sentencepiece; install the project's requirements.txt first" >&2; exit 2; }

# On Linux, ggml's CMake enables AVX2 at most; -march=native lets it use whatever this CPU has (AVX-512 included).
CHATGLM_CPP_CMAKE_ARGS=${CHATGLM_CPP_CMAKE_ARGS--DCMAKE_C_FLAGS=-march=native -DCMAKE_CXX_FLAGS=-march=native}
echo "ggml CMake options:${CHATGLM_CPP_CMAKE_ARGS:- (defaults)}"

"$PYTHON" -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install --quiet tabulate
# chatglm.cpp's CMakeLists asks for a CMake policy version that CMake 4 dropped; the minimum override lets it build.
CMAKE_ARGS="$CHATGLM_CPP_CMAKE_ARGS" CMAKE_POLICY_VERSION_MINIMUM=3.5 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  "$VENV/bin/python" -m pip install --no-binary chatglm-cpp --no-cache-dir "chatglm-cpp==0.4.2"
# The thread-count shim (see hardware_concurrency.c); run_suite.py preloads it when it is there.
cc -O2 -shared -fPIC -o "$VENV/lib/libhardware_concurrency.so" "$HERE/hardware_concurrency.c"
"$VENV/bin/python" -c "import chatglm_cpp, chatglm_cpp.convert; print('chatglm-cpp', chatglm_cpp.__version__, 'ready')"
echo "peer python: $VENV/bin/python"
