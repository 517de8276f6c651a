"""Pre-flight memory checks: estimate what an allocation needs, compare it with what the device has free, and refuse
with both numbers and what to lower, before anything is allocated."""
import math
import os
from pathlib import Path

import torch
import torch.nn as nn

from chatglm2.config import ChatGLM2Config
from chatglm2.errors import InputError
from chatglm2.kv_pool import BLOCK_SIZE, blocks_for

GiB = 2 ** 30
DEFAULT_KV_CACHE_MEMORY = 0.9  # of an accelerator's memory free after the weights: the rest for activations, graphs


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


def kv_pool_shape(config: ChatGLM2Config, tokens: int, tp_size: int = 1) -> tuple[int, ...]:
    """The keys (or values) of one layer of one rank's pool for `tokens` tokens: [blocks x BLOCK_SIZE, this rank's KV
    groups, head_dim], with one more block for padding (kv_pool.NULL_BLOCK)."""
    return (blocks_for(tokens) + 1) * BLOCK_SIZE, config.rank_kv_groups(tp_size), config.kv_channels


def kv_block_bytes(config: ChatGLM2Config, tp_size: int, dtype: torch.dtype) -> int:
    """One block of every layer's keys and values on one rank: 28 KiB per token for ChatGLM2-6B in fp16."""
    pool_of_one_block = math.prod(kv_pool_shape(config, 1, tp_size))  # that block and the null block
    return config.num_layers * 2 * pool_of_one_block // 2 * dtype.itemsize


def kv_cache_bytes(config: ChatGLM2Config, tokens: int, tp_size: int, dtype: torch.dtype) -> int:
    return (blocks_for(tokens) + 1) * kv_block_bytes(config, tp_size, dtype)


def kv_cache_tokens_in(fraction: float, config: ChatGLM2Config, tp_size: int, dtype: torch.dtype,
                       device: torch.device) -> int:
    """The KV cache, in whole blocks, that `fraction` of the device's free memory holds (asked after the weights are
    loaded, as vLLM's gpu_memory_utilization sizes its cache)."""
    blocks = int(fraction * available_bytes(device)) // kv_block_bytes(config, tp_size, dtype)
    return max(blocks - 1, 0) * BLOCK_SIZE  # less the null block


def kv_cache_advice(tokens: int, max_seq_len: int) -> str:
    return (f"lower MAX_SEQ_LEN (now {max_seq_len}), the sequences at once (--batch, --max_batch) or a server's "
            f"--kv_cache_tokens (KV_CACHE_TOKENS; now {tokens} tokens)")


def check_kv_cache_fits(config: ChatGLM2Config, tokens: int, max_seq_len: int, tp_size: int, dtype: torch.dtype,
                        device: torch.device) -> None:
    """InputError when a KV cache of `tokens` tokens alone exceeds the free memory. It needs no model, so loading
    asks first, in a moment, whatever the size of the weights."""
    check_fits(f"the KV cache of {tokens} tokens", kv_cache_bytes(config, tokens, tp_size, dtype), device,
               f"{kv_cache_advice(tokens, max_seq_len)}, or check num_layers in config.json (now {config.num_layers})")
