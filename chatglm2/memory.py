"""Pre-flight memory checks: estimate what an allocation needs, compare it with what the device has free, and refuse
with both numbers and what to lower, before anything is allocated."""
import math
import os
from pathlib import Path

import torch
import torch.nn as nn

from chatglm2.config import ChatGLM2Config
from chatglm2.errors import InputError

GiB = 2 ** 30


def available_bytes(device: torch.device) -> int:
    """Free memory of the device: the accelerator's free memory, or the host's available RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "npu":
        return torch.npu.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(what: str, needed: int, device: torch.device, advice: str) -> None:
    """InputError when `needed` bytes for `what` exceed the device's free memory."""
    available = available_bytes(device)
    if needed > available:
        where = "RAM" if device.type == "cpu" else f"{device} memory"
        raise InputError(f"{what} needs {needed / GiB:.2f} GiB but only {available / GiB:.2f} GiB of {where} is "
                         f"available; {advice}")


def module_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of a (meta) module's tensors once loaded: float parameters at `dtype`, buffers (quantized weights and
    their scales) as they are."""
    return sum(p.numel() * dtype.itemsize for p in module.parameters()) + \
        sum(b.numel() * b.element_size() for b in module.buffers())


def kv_cache_shape(config: ChatGLM2Config, slots: int, max_seq_len: int, tp_size: int = 1) -> tuple[int, ...]:
    """The preallocated cache of one rank: [layers, K/V, slots, this rank's KV groups, MAX_SEQ_LEN, head_dim]."""
    return config.num_layers, 2, slots, config.rank_kv_groups(tp_size), max_seq_len, config.kv_channels


def kv_cache_bytes(config: ChatGLM2Config, slots: int, max_seq_len: int, tp_size: int, dtype: torch.dtype) -> int:
    """28 KiB per token for ChatGLM2-6B in fp16."""
    return math.prod(kv_cache_shape(config, slots, max_seq_len, tp_size)) * dtype.itemsize


def check_kv_cache_fits(config: ChatGLM2Config, slots: int, max_seq_len: int, tp_size: int, dtype: torch.dtype,
                        device: torch.device) -> None:
    """InputError when the KV cache of `slots` sequences alone exceeds the free memory. It needs no model, so loading
    asks first, in a moment, whatever the size of the weights."""
    check_fits(f"the KV cache of {slots} sequence(s) of MAX_SEQ_LEN={max_seq_len} tokens",
               kv_cache_bytes(config, slots, max_seq_len, tp_size, dtype), device,
               f"lower MAX_SEQ_LEN (now {max_seq_len}) or the sequences at once (--batch, --max_batch; now {slots}), "
               f"or check num_layers in config.json (now {config.num_layers})")
