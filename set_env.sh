#!/usr/bin/env bash
# Source this before running on an Ascend NPU: `source set_env.sh`. Elsewhere it only exports harmless variables.
# Paths follow the default CANN layout; override with ASCEND_TOOLKIT_HOME / ATB_HOME if yours differ.
ASCEND_TOOLKIT_HOME=${ASCEND_TOOLKIT_HOME:-/usr/local/Ascend/ascend-toolkit}
ATB_HOME=${ATB_HOME:-/usr/local/Ascend/nnal/atb}
for env_script in "$ASCEND_TOOLKIT_HOME/set_env.sh" "$ATB_HOME/set_env.sh"; do
  if [ -f "$env_script" ]; then
    # shellcheck disable=SC1090
    source "$env_script"
  fi
done

# The seed's runtime settings for HCCL (tensor parallel) and the ATB operator library.
export HCCL_BUFFSIZE=110
export HCCL_OP_BASE_FFTS_MODE_ENABLE=TRUE
export TASK_QUEUE_ENABLE=1
export ATB_OPERATION_EXECUTE_ASYNC=1
export ATB_LAYER_INTERNAL_TENSOR_REUSE=1
# Multi-stream tiling copies speed up 300I Pro and 300I Duo cards.
export ATB_USE_TILING_COPY_STREAM=1
# Longest prompt + answer the KV cache holds (the seed's default).
export MAX_SEQ_LEN=${MAX_SEQ_LEN:-2048}
