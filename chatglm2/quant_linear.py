"""W8A8 inference: the activation quantizer, the int8 x int8 kernels of each device, and QuantLinear."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from chatglm2.device import torch_npu

ROUNDING_MAGIC = 1.5 * 2 ** 23  # fp32 values in [-2^22, 2^22] plus this land where the spacing is 1: rounded, half to even


def quantize_activation(x: torch.Tensor, input_scale: float, input_offset: float) -> torch.Tensor:
    """clamp(round(x / input_scale + input_offset), -128, 127) as int8; in fp32 so bf16/fp16 inputs round alike.

    Clamping first, then adding and subtracting 1.5 * 2^23, rounds exactly as torch.round (half to even), without its
    CPU kernel: round, floor and trunc enter the thread pool even for one token's row, and on a busy machine every
    such entry waits for a descheduled thread (it doubled the int8 decode step when another process held a core).
    """
    clamped = torch.clamp(x.float() / input_scale + input_offset, -128, 127)
    return ((clamped + ROUNDING_MAGIC) - ROUNDING_MAGIC).to(torch.int8)


def quant_matmul(x_q: torch.Tensor, quant_weight_t: torch.Tensor, quant_bias: torch.Tensor, deq_scale: torch.Tensor,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """(x_q @ quant_weight_t + quant_bias) * deq_scale with int8 x int8 -> int32 products.

    x_q: int8 [m, k]; quant_weight_t: int8 [k, n] (the transposed view of the stored [n, k] weight); quant_bias:
    int32 [n]; deq_scale: fp32 [n]. Returns out_dtype [m, n].
    """
    if x_q.device.type == "npu":
        # npu_quant_matmul takes an fp32 scale for bf16 output, but wants it recoded to int64 for fp16 output
        scale = torch_npu().npu_trans_quant_param(deq_scale) if out_dtype == torch.float16 else deq_scale
        return torch_npu().npu_quant_matmul(x_q, quant_weight_t, scale, bias=quant_bias, output_dtype=out_dtype)
    m, k = x_q.shape
    if x_q.device.type == "cuda" and (k % 8 or quant_weight_t.shape[1] % 8):
        acc = x_q.double() @ quant_weight_t.double()  # cuBLASLt int8 needs k, n % 8 == 0; float64 is still exact here
    elif x_q.device.type == "cuda" and m <= 16:
        acc = torch._int_mm(F.pad(x_q, (0, 0, 0, 17 - m)), quant_weight_t)[:m]  # and more than 16 rows
    else:
        acc = torch._int_mm(x_q, quant_weight_t)
    return ((acc + quant_bias).float() * deq_scale).to(out_dtype)


def can_pack_quant_weight(weight: torch.Tensor) -> bool:
    """oneDNN's prepacked int8 layout exists for CPU tensors only."""
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


def row_sums(weight: torch.Tensor, rows_per_chunk: int = 1024) -> torch.Tensor:
    """Exact int32 row sums of an int8 matrix, a chunk of rows at a time: summing with a wider dtype converts the
    whole matrix first (eight times its size for float64)."""
    return torch.cat([chunk.sum(1, dtype=torch.int32) for chunk in weight.split(rows_per_chunk)])


class QuantLinear(nn.Module):
    """W8A8 linear: x quantized per tensor, an int8 x int8 -> int32 matmul, + quant_bias, * deq_scale.

    Built empty (on the meta device while the model is built), then given its tensors by `load`, so the float
    weights it replaces are never read.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.input_scale, self.input_offset = 1.0, 0.0
        self.register_buffer("quant_bias", torch.empty(out_features, dtype=torch.int32))
        self.register_buffer("deq_scale", torch.empty(out_features, dtype=torch.float32))
        # int8 [out, in] as stored; weight.t() is the column-major [in, out] operand the int8 kernels are fastest on
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.packed_weight = None

    def load(self, weight: torch.Tensor, quant_bias: torch.Tensor, deq_scale: torch.Tensor, input_scale: float,
             input_offset: float, pack: bool = True) -> "QuantLinear":
        """Take this layer's tensors (on the device it runs on). pack: on CPU keep only oneDNN's prepacked copy (the
        raw one would double the memory), with the bias folded for it; elsewhere the raw weight is what runs."""
        self.input_scale, self.input_offset = input_scale, input_offset
        self.quant_bias, self.deq_scale = quant_bias, deq_scale
        if pack and can_pack_quant_weight(weight):
            self.packed_weight = pack_quant_weight(weight)
            folded = deq_scale.double() * (quant_bias.double() + input_offset * row_sums(weight).double())
            self.register_buffer("folded_bias", folded.float())
            weight = None
        self.weight = weight
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = quantize_activation(x.reshape(-1, self.in_features), self.input_scale, self.input_offset)
        if self.packed_weight is not None:
            y = packed_quant_matmul(x_q, self.packed_weight, self.input_offset, self.folded_bias, self.deq_scale,
                                    x.dtype)
        else:
            y = quant_matmul(x_q, self.weight.t(), self.quant_bias, self.deq_scale, x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, input_scale={self.input_scale:.4g}, " \
               f"input_offset={self.input_offset:g}, packed={self.packed_weight is not None}"
