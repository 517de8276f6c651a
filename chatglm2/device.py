"""Which device and dtype to run on, and the little device policy around it (threads, synchronisation)."""
import functools
import importlib.util
import os

import torch

from chatglm2.errors import InputError

DEVICE_KINDS = ("auto", "npu", "cuda", "cpu")


@functools.cache
def npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401  (registers torch.npu)
    return torch.npu.is_available()


def torch_npu():
    """The torch_npu module, imported only where an NPU tensor is at hand (it cannot be imported without CANN)."""
    import torch_npu
    return torch_npu


def select_device(kind: str = "auto", index: int = 0) -> torch.device:
    """NPU if present, else CUDA, else CPU; `kind` forces one and fails clearly when it is absent."""
    kind = (kind or "auto").lower()
    if kind not in DEVICE_KINDS:
        raise InputError(f"unknown device kind {kind!r}; use one of {', '.join(DEVICE_KINDS)}")
    if kind == "auto":
        kind = "npu" if npu_available() else "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    available, count = ((npu_available(), torch.npu.device_count() if npu_available() else 0) if kind == "npu"
                        else (torch.cuda.is_available(), torch.cuda.device_count()))
    if not available:
        raise InputError(f"--backend {kind} was asked for but no {kind.upper()} is available; use --backend auto or cpu")
    if index >= count:
        raise InputError(f"device {kind}:{index} does not exist ({count} present); lower --device or --tp_size")
    return torch.device(kind, index)


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on accelerators (as the reference), bf16 on CPUs with native bf16 support, else fp32."""
    if device.type in ("npu", "cuda"):
        return torch.float16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock timings cover the work (CPU ops are already synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def set_cpu_threads() -> None:
    """torchrun pins every process to one thread; give each local rank its share of the cores instead."""
    if "LOCAL_WORLD_SIZE" in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
