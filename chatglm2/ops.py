"""The operators the Ascend reference takes from ATB, with a plain-PyTorch path (CPU, CUDA) and a torch_npu path.

Each op dispatches on the device of its input, so one model runs everywhere. The torch_npu branches are thin
wrappers over torch_npu's fused kernels; they have not been run on Ascend hardware by this project.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from chatglm2.device import torch_npu


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with the variance in fp32, as ChatGLM2 computes it."""
    if x.device.type == "npu":
        return torch_npu().npu_rms_norm(x, weight, epsilon=eps)[0]
    # one fused kernel where PyTorch has it (CUDA); the same value as weight * (x32 * rsqrt(mean(x32^2) + eps))
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


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
        rotated = torch_npu().npu_rotary_mul(x[..., :rotary_dim].contiguous(), cos2, sin2, rotary_mode="interleave")
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
        if q.device.type == "cuda":
            return decode_attention_matmul(grouped_q, k, v, mask).reshape(batch, 1, heads * head_dim)
        out = F.scaled_dot_product_attention(grouped_q, k, v, attn_mask=mask)
        return out.reshape(batch, 1, heads * head_dim)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, is_causal=mask is None,
                                         enable_gqa=groups != heads)
    return out.transpose(1, 2).reshape(batch, seq, heads * head_dim)


def decode_attention_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with two batched matmuls and an fp32 softmax; q: [batch, groups, queries, d].

    For decoding on a GPU: the fused attention kernels give each (row, group) pair one thread block that walks every
    key, and ChatGLM2 has 2 groups, so at batch 1 two blocks crawl through the whole cache (measured on an H200: about
    0.35 ms per layer at 9216 keys, more than the layer's weights take). The matmuls spread the keys over the GPU.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)


def _npu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    batch, seq, heads, head_dim = q.shape
    keys = k.shape[2]
    if mask is None:
        mask = torch.ones(seq, keys, dtype=torch.bool, device=q.device).tril(keys - seq)[None, None]
    out = torch_npu().npu_fused_infer_attention_score(
        q.transpose(1, 2), k, v, num_heads=heads, num_key_value_heads=k.shape[1], input_layout="BNSD",
        scale=head_dim ** -0.5, atten_mask=~mask.expand(batch, 1, seq, keys))[0]
    return out.transpose(1, 2).reshape(batch, seq, heads * head_dim)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(first half) * second half, along the last dim."""
    if x.device.type == "npu":
        return torch_npu().npu_swiglu(x, dim=-1)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


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
