"""Weight-only int8 / int4 linear layers and the matmul kernel of each device.

The stored format, the same on every device before a kernel repacks it (weight_only.py writes it):
  int8  weight int8 [out, in]; scales [out]: w = q * scale (symmetric, one scale per output row)
  int4  weight uint8 [out, in / 2]: two 4-bit codes q in 0..15 per byte, the even column in the high nibble (THUDM's
        order); scales [in / group, out, 2] holding (scale, zero) of every group of `group` input columns:
        w = (q - 8) * scale + zero, which is tinygemm's convention and layout, so the CPU and CUDA int4 kernels take
        the scales as they are
Scales are kept in the model's dtype, as the kernels want them.

An int8 layer may also quantize its activations (quantize_activations, off unless asked for): each input row is
rounded to 8 bits on its own grid, max|row| / 127, at run time, as torch.ao's dynamic quantization does (ggml's Q8_0
does it per block of 32). A row's grid is its own, so a row never depends on the others in its batch; under tensor
parallel the layers that hold a slice of the input columns take the row maximum over all ranks, so the ranks round
exactly as one process does. Every kernel computes that same function; on x86 CPUs fbgemm then multiplies in integers.

Kernels, picked per layer at load (`kernel_for`):
  fbgemm    int8 with quantize_activations on x86 CPUs: fbgemm's integer GEMM (AVX2 / AVX-512 VNNI) on its packed
            weight, as fast as memory allows at any batch size: 1.4x to 1.6x faster than torch._weight_int8pack_mm at
            one row, 4x to 6x at 8 to 128 rows (docs/weight_only.md#kernels-per-device)
  cpu       int8: torch._weight_int8pack_mm; int4: torch._weight_int4pack_mm_for_cpu on the weight repacked by
            torch._convert_weight_to_int4pack_for_cpu (fp32, bf16 or fp16 activations)
  cuda      int4: torch._weight_int4pack_mm (tinygemm; bf16 activations, fp16 ones are cast around it) on the weight
            repacked by torch._convert_weight_to_int4pack; int8: torch._weight_int8pack_mm where this torch build has
            it for CUDA, else the portable path. Static shapes and no host synchronisation, so a decode step that
            uses them can be captured in a CUDA graph. Not run on a GPU by the tests.
  npu       torch_npu.npu_weight_quant_batchmatmul (int8, and int4 carried in int32 by npu_convert_weight_to_int4pack);
            written from Huawei's documented signatures, never run on Ascend hardware.
  portable  dequantize to the activations' dtype, then F.linear: any device, any shape; the reference the others are
            tested against, and what runs where a fast kernel does not fit the shape.
`portable_kernels()` makes every layer loaded inside it use the portable path, so that the code every non-CPU device
falls back to runs under the CPU tests too.
"""
import contextlib
import contextvars
import warnings
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from chatglm2.device import torch_npu

GROUP_SIZES = (32, 64, 128, 256)  # what the CPU and CUDA int4 kernels accept
HAS_FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines and \
    hasattr(torch, "_make_per_channel_quantized_tensor") and \
    hasattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32")
_force_portable = contextvars.ContextVar("force_portable", default=False)


@contextlib.contextmanager
def portable_kernels() -> Iterator[None]:
    """Layers loaded inside this block run dequantize-then-matmul on whatever device they are on."""
    token = _force_portable.set(True)
    try:
        yield
    finally:
        _force_portable.reset(token)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, cols / 2] -> uint8 codes [rows, cols], the high nibble first."""
    return torch.stack((packed >> 4, packed & 15), dim=-1).flatten(-2)


def dequantize(weight: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The float [out, in] weight that the stored format stands for, in `dtype`."""
    if bits == 8:
        return (weight.to(torch.float32) * scales.to(torch.float32)[:, None]).to(dtype)
    codes = unpack_int4(weight).to(torch.float32)
    out_features, in_features = codes.shape
    groups = scales.shape[0]
    scale, zero = scales.to(torch.float32).permute(1, 0, 2).unbind(-1)  # [out, groups] each
    grouped = codes.view(out_features, groups, in_features // groups)
    return ((grouped - 8) * scale[..., None] + zero[..., None]).view(out_features, in_features).to(dtype)


def kernel_for(device: torch.device, bits: int, out_features: int, in_features: int, group_size: int,
               traceable: bool = False, quantize_activations: bool = False) -> str:
    """The fastest kernel this device has for the layer's shape, else "portable" (measured:
    docs/weight_only.md#kernels-per-device).
    traceable: one that torch.compile can trace (fbgemm's packed weight is opaque to it)."""
    if _force_portable.get():
        return "portable"
    if device.type == "npu":
        return "npu"
    int4_group_ok = group_size in GROUP_SIZES and in_features % group_size == 0
    if device.type == "cpu":
        if bits == 8:
            return "fbgemm" if quantize_activations and HAS_FBGEMM and not traceable else "cpu"
        return "cpu" if int4_group_ok and out_features % 16 == 0 else "portable"
    if device.type == "cuda":
        if bits == 4:
            return "cuda" if int4_group_ok and out_features % 8 == 0 and in_features % 32 == 0 else "portable"
        return "cuda"
    return "portable"


def inner_k_tiles(in_features: int) -> int:
    """tinygemm's tiling along the input: in_features must be a multiple of 16 x tiles (8 is its fastest)."""
    return next(tiles for tiles in (8, 4, 2) if in_features % (16 * tiles) == 0)


def pack_for_fbgemm(weight: torch.Tensor, scales: torch.Tensor) -> torch.ScriptObject:
    """int8 [out, in] and row scales -> fbgemm's packed weight (a copy in its own blocked layout; the caller drops the
    int8 tensor). The quantized-tensor constructors it needs are deprecated in torch 2.13, hence the silenced warning;
    HAS_FBGEMM turns this path off where they are gone."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            quantized = torch._make_per_channel_quantized_tensor(
                weight, scales.to(torch.float64), torch.zeros(len(scales), dtype=torch.int64), 0)
            return torch.ops.quantized.linear_prepack(quantized, None)
    finally:
        torch.backends.quantized.engine = previous


def activation_steps(x: torch.Tensor, input_split: bool) -> torch.Tensor:
    """fp32 [m, 1]: the 8-bit step of each row, max|row| / 127. input_split: this rank holds a slice of the input
    columns (a row-parallel layer under tensor parallel), so the maximum is taken over every rank's slice."""
    row_max = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    if input_split:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
    return row_max.div_(127).clamp_(min=torch.finfo(torch.float32).tiny)


def round_rows(x: torch.Tensor, input_split: bool) -> torch.Tensor:
    """Each row rounded to its 8-bit grid, in x's dtype: what fbgemm multiplies, for the kernels that take floats."""
    step = activation_steps(x, input_split)
    return torch.div(x, step).round_().mul_(step).to(x.dtype)


def fbgemm_matmul(x: torch.Tensor, packed: torch.ScriptObject, input_split: bool) -> torch.Tensor:
    """x [m, in] @ W^T with x's rows rounded to 8 bits: fbgemm adds 128 to make the integers uint8 (zero point 128,
    scale 1 on the pre-divided rows), multiplies in int32 and applies the weight's row scales; then each row's step."""
    step = activation_steps(x, input_split)
    y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(torch.div(x, step), 1.0, 128, packed)
    return y.mul_(step).to(x.dtype)


def pack_for_kernel(kernel: str, bits: int, weight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The stored format -> what the kernel reads: (weight, scales[, offsets])."""
    if kernel == "cpu" and bits == 4:
        # _convert_weight_to_int4pack_for_cpu wants the codes one per int32; a slice of rows at a time keeps that
        # temporary small (its layout is blocked by 64 rows on AVX-512, 32 on AVX2, so slices of 1024 rows
        # concatenate exactly)
        packed = torch.empty_like(weight)
        for start in range(0, weight.shape[0], 1024):
            rows = weight[start:start + 1024]
            packed[start:start + len(rows)] = torch._convert_weight_to_int4pack_for_cpu(
                unpack_int4(rows).to(torch.int32), 1)
        return packed, scales
    if kernel == "cuda" and bits == 4:
        return torch._convert_weight_to_int4pack(weight, inner_k_tiles(weight.shape[1] * 2)), \
            scales.to(torch.bfloat16)
    if kernel == "npu":
        return pack_for_npu(bits, weight, scales)
    return weight, scales


def pack_for_npu(bits: int, weight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """npu_weight_quant_batchmatmul computes x @ ((w + offset) * scale) with w [in, out]: int8 as it is, int4 as signed
    values carried eight to an int32. Our int4 (q - 8) * s + z is (signed + z / s) * s, so offset = z / s."""
    if bits == 8:
        return weight.t(), scales, None
    signed = (unpack_int4(weight).to(torch.int32) - 8).t().contiguous()
    scale, zero = scales.unbind(-1)  # [groups, out]
    return torch_npu().npu_convert_weight_to_int4pack(signed), scale.contiguous(), (zero / scale).contiguous()


def weight_only_matmul(kernel: str, bits: int, group_size: int, x: torch.Tensor, weight: torch.Tensor,
                       scales: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    """x [m, in] @ W^T -> [m, out] in x's dtype, W given in `kernel`'s layout."""
    if kernel == "cpu":
        if bits == 8:
            return torch._weight_int8pack_mm(x, weight, scales)
        return torch._weight_int4pack_mm_for_cpu(x, weight, group_size, scales)
    if kernel == "cuda":
        if bits == 8:  # gpt-fast's form: compiled, the cast fuses into the matmul's reads
            return F.linear(x, weight.to(x.dtype)) * scales
        return torch._weight_int4pack_mm(x.to(torch.bfloat16), weight, group_size, scales).to(x.dtype)
    if kernel == "npu":
        return torch_npu().npu_weight_quant_batchmatmul(x, weight, scales, antiquant_offset=offsets,
                                                        antiquant_group_size=0 if bits == 8 else group_size)
    return F.linear(x, dequantize(weight, scales, bits, x.dtype))


class WeightOnlyLinear(nn.Module):
    """y = x @ W^T + b with W held as int8 per output row or int4 per group; x and y in the model's dtype.

    Built empty with the buffers' final dtypes and sizes (so a meta model's memory estimate is right), then given its
    weights in the stored format by `load`, which repacks them for the device's kernel.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        if bits == 8:
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.empty(out_features, dtype=dtype))
        else:
            self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.empty(in_features // group_size, out_features, 2, dtype=dtype))
        self.offsets: torch.Tensor | None = None
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.kernel = "portable"
        self.packed: torch.ScriptObject | None = None  # fbgemm's weight, which then replaces `weight`
        self.quantize_activations = False  # int8 only: round input rows to 8 bits (see the module's docstring)
        self.input_split = False  # a row-parallel layer under tensor parallel (see activation_steps)

    def load(self, weight: torch.Tensor, scales: torch.Tensor, traceable: bool = False) -> None:
        """Take the stored format (on the device this layer runs on) and repack it for that device's kernel
        (traceable: one that torch.compile can trace)."""
        if weight.shape != self.weight.shape or scales.shape != self.scales.shape:
            raise ValueError(f"weight {tuple(weight.shape)} / scales {tuple(scales.shape)} do not fit a layer of "
                             f"{tuple(self.weight.shape)} / {tuple(self.scales.shape)}")
        self.kernel = kernel_for(weight.device, self.bits, self.out_features, self.in_features, self.group_size,
                                 traceable, self.quantize_activations)
        scales = scales.to(self.scales.dtype)
        if self.kernel == "fbgemm":
            self.packed = pack_for_fbgemm(weight, scales)
            self.weight, self.scales = torch.empty(0, dtype=torch.int8), scales
            return
        packed = pack_for_kernel(self.kernel, self.bits, weight, scales)
        self.weight, self.scales = packed[0], packed[1]
        self.offsets = packed[2] if len(packed) > 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.kernel == "fbgemm":
            y = fbgemm_matmul(rows, self.packed, self.input_split)
        else:
            if self.quantize_activations:
                rows = round_rows(rows, self.input_split)
            y = weight_only_matmul(self.kernel, self.bits, self.group_size, rows, self.weight, self.scales,
                                   self.offsets)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        activations = ", int8 activations" if self.quantize_activations else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}{group}" \
               f"{activations}, kernel={self.kernel}, bias={self.bias is not None}"
