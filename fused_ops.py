"""The operators the Ascend reference takes from ATB, with a plain-PyTorch path (CPU, CUDA) and a torch_npu path.

Each op dispatches on the device of its input, so one model runs everywhere. The torch_npu branches are thin
wrappers over torch_npu's fused kernels; they have not been run on Ascend hardware by this project.
"""
import functools
import importlib.util
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import InputError

DEVICE_KINDS = ("auto", "npu", "cuda", "cpu")


@functools.cache
def npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401  (registers torch.npu)
    return torch.npu.is_available()


def _torch_npu():
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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with the variance in fp32, as ChatGLM2 computes it."""
    if x.device.type == "npu":
        return _torch_npu().npu_rms_norm(x, weight, epsilon=eps)[0]
    x32 = x.float()
    return (weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def rotary_tables(max_positions: int, rotary_dim: int, base: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [max_positions, rotary_dim // 2] in fp32, for theta_i = base^(-2i / rotary_dim)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2*cos.shape[-1] dims of each head as interleaved pairs (GPT-J style).

    x: [batch, seq, heads, head_dim]; cos, sin: [batch, seq, rotary_dim // 2].
    """
    rotary_dim = cos.shape[-1] * 2
    if x.device.type == "npu" and cos.shape[0] == 1:
        # npu_rotary_mul's interleave mode takes cos/sin broadcast over the batch (1, S, 1, D) only.
        cos2 = cos.repeat_interleave(2, -1).unsqueeze(2).to(x.dtype)
        sin2 = sin.repeat_interleave(2, -1).unsqueeze(2).to(x.dtype)
        rotated = _torch_npu().npu_rotary_mul(x[..., :rotary_dim].contiguous(), cos2, sin2, rotary_mode="interleave")
        return torch.cat((rotated, x[..., rotary_dim:]), -1)
    pairs = x[..., :rotary_dim].float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), -1).flatten(-2)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), -1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Multi-query attention over a KV cache, for prefill (many queries) and decode (one query).

    q: [batch, seq, heads, head_dim]; k, v: [batch, groups, keys, head_dim] (the cache layout; query head h uses
    group h // (heads // groups)); mask: bool [batch, 1, seq, keys], True = may attend, or None for plain causal
    attention with no padding. Returns [batch, seq, heads * head_dim].
    """
    batch, seq, heads, head_dim = q.shape
    groups = k.shape[1]
    if q.device.type == "npu":
        return _npu_attention(q, k, v, mask)
    if seq == 1:
        # One query per head: lay each group's heads out as a query sequence so K and V are read once per group.
        grouped_q = q.view(batch, groups, heads // groups, head_dim)
        out = F.scaled_dot_product_attention(grouped_q, k, v, attn_mask=mask)
        return out.reshape(batch, 1, heads * head_dim)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, is_causal=mask is None,
                                         enable_gqa=groups != heads)
    return out.transpose(1, 2).reshape(batch, seq, heads * head_dim)


def _npu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    batch, seq, heads, head_dim = q.shape
    keys = k.shape[2]
    if mask is None:
        mask = torch.ones(seq, keys, dtype=torch.bool, device=q.device).tril(keys - seq)[None, None]
    out = _torch_npu().npu_fused_infer_attention_score(
        q.transpose(1, 2), k, v, num_heads=heads, num_key_value_heads=k.shape[1], input_layout="BNSD",
        scale=head_dim ** -0.5, atten_mask=~mask.expand(batch, 1, seq, keys))[0]
    return out.transpose(1, 2).reshape(batch, seq, heads * head_dim)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(first half) * second half, along the last dim."""
    if x.device.type == "npu":
        return _torch_npu().npu_swiglu(x, dim=-1)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def quant_matmul(x_q: torch.Tensor, quant_weight_t: torch.Tensor, quant_bias: torch.Tensor, deq_scale: torch.Tensor,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """(x_q @ quant_weight_t + quant_bias) * deq_scale with int8 x int8 -> int32 products.

    x_q: int8 [m, k]; quant_weight_t: int8 [k, n] (the transposed view of the stored [n, k] weight); quant_bias:
    int32 [n]; deq_scale: fp32 [n]. Returns out_dtype [m, n].
    """
    if x_q.device.type == "npu":
        # npu_quant_matmul takes an fp32 scale for bf16 output, but wants it recoded to int64 for fp16 output
        scale = _torch_npu().npu_trans_quant_param(deq_scale) if out_dtype == torch.float16 else deq_scale
        return _torch_npu().npu_quant_matmul(x_q, quant_weight_t, scale, bias=quant_bias, output_dtype=out_dtype)
    m, k = x_q.shape
    if x_q.device.type == "cuda" and (k % 8 or quant_weight_t.shape[1] % 8):
        acc = x_q.double() @ quant_weight_t.double()  # cuBLASLt int8 needs k, n % 8 == 0; float64 is still exact here
    elif x_q.device.type == "cuda" and m <= 16:
        acc = torch._int_mm(F.pad(x_q, (0, 0, 0, 17 - m)), quant_weight_t)[:m]  # and more than 16 rows
    else:
        acc = torch._int_mm(x_q, quant_weight_t)
    return ((acc + quant_bias).float() * deq_scale).to(out_dtype)


def can_pack_quant_weight(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and torch.backends.mkldnn.is_available() and \
        hasattr(torch.ops.onednn, "qlinear_prepack")


def pack_quant_weight(weight: torch.Tensor) -> torch.Tensor:
    """An int8 [out, in] weight in oneDNN's prepacked layout. On CPU torch._int_mm is fast for one row only and
    reorders the weight on every call for more (about 6x slower at 8 rows); the prepacked kernel is fast at any."""
    return torch.ops.onednn.qlinear_prepack(weight, [1, weight.shape[1]])


def packed_quant_matmul(x_q: torch.Tensor, packed_weight: torch.Tensor, input_offset: int, folded_bias: torch.Tensor,
                        deq_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """(x_q - input_offset) @ W^T * deq_scale + folded_bias with a prepacked weight: the same value as
    (x_q @ W^T + quant_bias) * deq_scale when folded_bias = deq_scale * (quant_bias + input_offset * W.sum(1)),
    up to fp32 rounding."""
    x_u8 = (x_q.to(torch.int16) + 128).to(torch.uint8)  # oneDNN wants unsigned activations: shift them and the zero point
    kernel_dtype = out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32
    y = torch.ops.onednn.qlinear_pointwise(x_u8, 1.0, int(input_offset) + 128, packed_weight, deq_scale,
                                           torch.zeros_like(deq_scale, dtype=torch.int64), folded_bias, 1.0, 0,
                                           kernel_dtype, "none", [], "")
    return y.to(out_dtype)


class PackedLinear(nn.Module):
    """A CPU linear layer whose weight is kept in oneDNN's prepacked (blocked) layout.

    With plain F.linear a one-token decode step reads bf16 weights at well under half the memory bandwidth; the
    prepacked layout reads them at about full bandwidth and is no slower for prefill. Results equal F.linear.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Packed for one row per call: the decode step of batch 1, the case bounded by weight reads.
        self.weight = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1),
                                   requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def can_pack_linear(weight: torch.Tensor) -> bool:
    packable = (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)
    return weight.device.type == "cpu" and torch.backends.mkldnn.is_available() and weight.dtype in packable


def pack_linears(module: nn.Module) -> None:
    """Swap every plain nn.Linear inside `module` for a PackedLinear where the CPU supports it."""
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear and can_pack_linear(child.weight):
            setattr(module, name, PackedLinear(child))
        else:
            pack_linears(child)
