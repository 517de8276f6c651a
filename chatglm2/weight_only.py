"""Weight-only int8 / int4 models: which layers are quantized, quantizing float weights as they stream in, and THUDM's
quantized checkpoints (chatglm2-6b-int4 / int8), read and written.

Two sources, one stored format (see weight_only_linear.py):
  --quantize int8|int4 on a float checkpoint: the four encoder linears of every layer (and output_layer, as
      quantize_output_layer says, and the attention layers in the format quantize_attention says) are quantized
      tensor by tensor as they stream in; int8 per output row
      (symmetric), int4 per group of `group_size` input columns with a scale and an integer zero point; the norm
      that feeds a layer is folded into it first (FOLDED_NORMS).
  THUDM's checkpoints ("quantization_bit": 4 or 8 in config.json): the four encoder linears hold `weight` int8 and
      `weight_scale` (fp16, one per output row); the float value is the integer times its row's scale. For 4 bits
      each byte holds two signed nibbles, the first column of the pair in the high nibble (THUDM's CPU kernel
      quantization_kernels.c reads `w >> 4` then `(char)(w << 4) >> 4`; chatglm.cpp's converter stacks
      (high, low)). Everything else is float.
"""
import ctypes
import mmap
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from chatglm2.checkpoint import check_shape, iter_shards, read_config, weight_files, write_checkpoint
from chatglm2.config import ChatGLM2Config
from chatglm2.errors import InputError
from chatglm2.tensor_parallel import ROW_PARALLEL
from chatglm2.weight_only_linear import GROUP_SIZES, WeightOnlyLinear

QUANTIZE_CHOICES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 32  # beats Q4_0's accuracy at no loss of speed: docs/weight_only.md#int4-schemes
ENCODER_LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
BITS = {"int8": 8, "int4": 4}
OUTPUT_LAYER = "transformer.output_layer"
FINAL_NORM = "transformer.encoder.final_layernorm"
CHUNK_ELEMENTS = 2 ** 20  # quantize about this many weights at a time: each fp32 temporary is 4 MiB
MADV_DONTNEED = 4
LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
if LIBC is not None and not hasattr(LIBC, "malloc_trim"):  # musl
    LIBC = None


def release_memory(tensor: torch.Tensor) -> None:
    """Give back now, not when its shard closes, the memory of a float weight just quantized: the pages of a
    memory-mapped .bin shard count in this process's RSS once read (MADV_DONTNEED drops the page-aligned inside of
    the tensor's bytes; were they read again, the file would fill them in again), and glibc keeps the freed chunks of
    the quantizing temporaries unless trimmed. On ChatGLM2-6B's shape with --quantize int4 this takes the loading peak
    from 7.5 to 4.3 GiB. Only for tensors nobody reads again; a no-op off Linux/glibc."""
    if LIBC is None or tensor.device.type != "cpu":
        return
    start, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    first, end = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, (start + size) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > first:
        LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first), MADV_DONTNEED)
    LIBC.malloc_trim(0)


def float_rows(weight: torch.Tensor, device: torch.device,
               column_scale: torch.Tensor | None) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, fp32 rows on `device`) in chunks, each multiplied by column_scale (a folded norm weight)."""
    rows_per_chunk = max(1, CHUNK_ELEMENTS // weight.shape[1])
    for start in range(0, weight.shape[0], rows_per_chunk):
        rows = weight[start:start + rows_per_chunk].to(device=device, dtype=torch.float32)
        yield start, rows if column_scale is None else rows * column_scale


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype, device: torch.device,
                  column_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per output row: scale = max|w_row| / 127, q = round(w / scale). The scale is rounded to scale_dtype
    (what the kernels read) before q is computed, so q is the best code for the scale actually used."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=device)
    scales = torch.empty(weight.shape[0], dtype=scale_dtype, device=device)
    for start, rows in float_rows(weight, device, column_scale):
        scale = (rows.abs().amax(1) / 127).to(scale_dtype)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row
        q[start:start + len(rows)] = torch.round(rows / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        scales[start:start + len(rows)] = scale
    return q, scales


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [rows, cols] -> uint8 [rows, cols / 2], the even column in the high nibble."""
    return (codes[:, 0::2] << 4) | codes[:, 1::2]


def quantize_int4(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype, device: torch.device,
                  column_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric per group of group_size input columns: the group's range (widened to hold 0) is cut into 15 steps,
    with an integer zero point, so that 0 is a code: w = (q - zp) * scale, stored as tinygemm's (q - 8) * scale + zero
    with zero = (8 - zp) * scale. Zero must be on the grid: a near-zero weight that meets a large activation (weights
    facing outlier channels are small) would otherwise be off by up to half a step, times that activation. Scale and
    zero are rounded to scale_dtype before q is computed."""
    out_features, in_features = weight.shape
    groups = in_features // group_size
    packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
    scales = torch.empty(groups, out_features, 2, dtype=scale_dtype, device=device)
    for start, rows in float_rows(weight, device, column_scale):
        rows = rows.view(-1, groups, group_size)
        low, high = rows.amin(-1).clamp(max=0), rows.amax(-1).clamp(min=0)
        scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float16).tiny).to(scale_dtype).float()
        zero = ((8 - torch.round(-low / scale).clamp(0, 15)) * scale).to(scale_dtype).float()
        codes = torch.round((rows - zero[..., None]) / scale[..., None] + 8).clamp_(0, 15).to(torch.uint8)
        packed[start:start + len(rows)] = pack_int4(codes.view(len(rows), in_features))
        scales[:, start:start + len(rows)] = torch.stack((scale, zero), -1).transpose(0, 1).to(scale_dtype)
    return packed, scales


def thudm_group_size(in_features: int) -> int:
    """THUDM's one int4 scale per row is the same scale over every group of a row: groups as large as the kernels
    take (fewer scales to read), or the whole row where no kernel group size divides it."""
    return next((size for size in reversed(GROUP_SIZES) if in_features % size == 0), in_features)


def from_thudm(weight: torch.Tensor, weight_scale: torch.Tensor, bits: int, group_size: int,
               scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """THUDM's int8 weight and per-row scale -> the stored format. For int4, a signed nibble s in -8..7 becomes the
    code s + 8, which in 4 bits is s with its top bit flipped: one XOR with 0x88 converts both nibbles of a byte."""
    if bits == 8:
        return weight, weight_scale.to(scale_dtype)
    packed = weight.view(torch.uint8) ^ 0x88
    groups = weight.shape[1] * 2 // group_size
    scale = weight_scale.to(scale_dtype)[None, :].expand(groups, -1)
    return packed, torch.stack((scale, torch.zeros_like(scale)), -1)


def thudm_quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """THUDM's QuantizedLinear: scale = max|w_row| / (2^(bits-1) - 1) in the weight's dtype, q = round(w / scale) as
    int8; for 4 bits, each pair packed into one byte, the first in the high nibble. Returns (weight, weight_scale)."""
    scale = weight.abs().amax(1) / (2 ** (bits - 1) - 1)
    q = torch.round(weight.float() / scale.float()[:, None]).to(torch.int8)
    if bits == 4:
        q = (q[:, 0::2] << 4) | (q[:, 1::2] & 0x0F)
    return q, scale


def write_thudm_checkpoint(float_path: str | Path, out_path: str | Path, bits: int) -> Path:
    """THUDM's quantized layout from a float checkpoint (as chatglm2-6b-int4 was made from chatglm2-6b): config.json
    gains "quantization_bit", the four encoder linears of every layer become int8 `weight` + fp16 `weight_scale`, one
    shard at a time."""
    config = dict(read_config(float_path), quantization_bit=bits)
    num_shards = len(set(weight_files(float_path).values()))

    def shards():
        for _, shard in iter_shards(float_path):
            out = {}
            for name, tensor in shard.items():
                if name.endswith(".weight") and name.rpartition(".")[0].endswith(ENCODER_LINEARS):
                    out[name], out[name + "_scale"] = thudm_quantize(tensor.half(), bits)
                else:
                    out[name] = tensor
            yield out
    write_checkpoint(out_path, config, shards(), num_shards, float_path)
    return Path(out_path)


@dataclass
class LayerSpec:
    bits: int
    group_size: int
    thudm: bool  # from THUDM's int8 weight + weight_scale, else quantized from the float weight at load
    norm: str | None = None  # the RMSNorm that feeds only this layer, folded into it before quantizing
    quantize_activations: bool = False  # int8: input rows rounded to 8 bits at run time (weight_only_linear.py)


# The RMSNorm in front of each layer that reads only it. Its weight is folded into the layer's input columns before
# quantizing (and the norm's weight becomes ones), which the float function does not notice; then the columns that
# meet large activations because of a large norm weight get a grid as fine, relative to their effect, as the rest.
FOLDED_NORMS = {"self_attention.query_key_value": "input_layernorm", "mlp.dense_h_to_4h": "post_attention_layernorm"}


def plan_layers(config: ChatGLM2Config, quantize: str | None, group_size: int, quantize_output_layer: str | None,
                w8a8: bool, quantize_attention: str = "auto",
                quantize_activations: str | None = None) -> dict[str, LayerSpec]:
    """Module name -> how it is loaded, for every weight-only layer; the combinations that cannot work are refused.
    quantize_output_layer applies to weight-only models only: "auto" (the format of the other layers; for THUDM's
    checkpoints, float as stored), "int8", "int4" or None (float); quantize_attention ("auto", "int8", "int4") to
    query_key_value and self_attention.dense of a float checkpoint quantized at load; quantize_activations ("int8" or
    None) to every int8 layer."""
    for value, what, allowed in ((quantize, "quantize", QUANTIZE_CHOICES),
                                 (quantize_output_layer, "quantize_output_layer", ("auto",) + QUANTIZE_CHOICES),
                                 (quantize_attention, "quantize_attention", ("auto",) + QUANTIZE_CHOICES),
                                 (quantize_activations, "quantize_activations", ("int8",))):
        if value is not None and value not in allowed:
            raise InputError(f"unknown {what}={value!r}; use one of {', '.join(allowed)} (or None)")
    if quantize_attention not in ("auto", None) and (config.quantization_bit or not quantize):
        raise InputError(f"quantize_attention={quantize_attention} chooses the format of attention layers that "
                         f"--quantize makes from a float checkpoint; "
                         f"{'THUDM checkpoints hold theirs already' if config.quantization_bit else 'add --quantize'}")
    if group_size not in GROUP_SIZES:
        raise InputError(f"int4 group size {group_size} is not one of {', '.join(map(str, GROUP_SIZES))}")
    if w8a8 and (quantize or config.quantization_bit):
        what = "--quantize" if quantize else f"this checkpoint's quantization_bit {config.quantization_bit}"
        raise InputError(f"{what} (weight-only) and ENABLE_QUANT / ENABLE_SPARSE (W8A8) are two quantizations of the "
                         f"same layers; use one (W8A8 needs the float checkpoint)")
    if quantize and config.quantization_bit and BITS[quantize] != config.quantization_bit:
        raise InputError(f"this checkpoint holds THUDM's int{config.quantization_bit} weights (quantization_bit in "
                         f"config.json); --quantize {quantize} cannot requantize them: leave --quantize out, or load "
                         f"the float checkpoint")
    bits = config.quantization_bit or (BITS[quantize] if quantize else 0)
    if not bits:
        return {}
    thudm = bool(config.quantization_bit)
    attention_bits = bits if quantize_attention in ("auto", None) else BITS[quantize_attention]
    specs = {}
    for i in range(config.num_layers):
        prefix = f"transformer.encoder.layers.{i}."
        for name in ENCODER_LINEARS:
            norm = None if thudm or name not in FOLDED_NORMS else prefix + FOLDED_NORMS[name]
            layer_bits = attention_bits if name.startswith("self_attention.") else bits
            specs[prefix + name] = LayerSpec(layer_bits, group_size, thudm, norm)
    if quantize_output_layer == "auto" and thudm:
        quantize_output_layer = None  # THUDM's checkpoints store it in float, and THUDM's runtime computes it so
    if quantize_output_layer:
        head_bits = bits if quantize_output_layer == "auto" else BITS[quantize_output_layer]
        specs[OUTPUT_LAYER] = LayerSpec(head_bits, group_size, False, FINAL_NORM)
    if quantize_activations:
        if not any(spec.bits == 8 for spec in specs.values()):
            raise InputError("quantize_activations=int8 rounds the activations of int8 layers and this model has "
                             "none; use it with --quantize int8, --quantize_attention int8 or "
                             "--quantize_output_layer int8")
        for spec in specs.values():
            spec.quantize_activations = spec.bits == 8
    return specs


def use_weight_only_layers(model: nn.Module, specs: dict[str, LayerSpec], dtype: torch.dtype) -> None:
    """Swap the planned float linears of a meta model for empty WeightOnlyLinear layers of this rank's shape."""
    for name, spec in specs.items():
        linear = model.get_submodule(name)
        in_features, out_features = linear.in_features, linear.out_features
        group_size = thudm_group_size(in_features) if spec.thudm and spec.bits == 4 else spec.group_size
        if spec.bits == 4 and in_features % group_size:
            fits = [str(size) for size in GROUP_SIZES if in_features % size == 0]
            raise InputError(f"int4 group size {group_size} does not divide the {in_features} input columns of {name}"
                             f"{' on each tensor-parallel rank' if model.tp_size > 1 else ''}; use --group_size "
                             f"{' or '.join(fits) if fits else '... none fits: use int8'}")
        layer = WeightOnlyLinear(in_features, out_features, spec.bits, group_size, linear.bias is not None, dtype)
        layer.quantize_activations = spec.quantize_activations
        layer.input_split = model.tp_size > 1 and f"{name}.weight".endswith(ROW_PARALLEL)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)


class WeightOnlyLoader:
    """Takes the tensors of the weight-only layers, and of the norms folded into them, as they stream from the
    checkpoint (load_float_weights hands them over). A float weight is quantized once its norm's weight has been seen
    (in THUDM's .bin shards the norm comes first; safetensors sorts post_attention_layernorm after the MLP, so
    dense_h_to_4h waits a few tensors for it); THUDM's weight and weight_scale, which may sit in different shards, wait
    for each other. Quantizing runs on the device the model runs on, a slice of rows at a time. Biases are ordinary
    float parameters, loaded elsewhere. traceable: the layers must take kernels that torch.compile can trace."""

    def __init__(self, model: nn.Module, specs: dict[str, LayerSpec], device: torch.device, dtype: torch.dtype,
                 traceable: bool = False):
        self.model, self.specs, self.device, self.dtype, self.traceable = model, specs, device, dtype, traceable
        self.norm_users = {spec.norm: name for name, spec in specs.items() if spec.norm}
        self.norms: dict[str, torch.Tensor] = {}  # folded norm weights seen so far, fp32
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.loaded: set[str] = set()

    def takes(self, name: str) -> bool:
        module, _, attr = name.rpartition(".")
        return (module in self.specs and attr in ("weight", "weight_scale")) or \
            (module in self.norm_users and attr == "weight")

    def take(self, name: str, tensor: torch.Tensor, source: Path) -> None:
        module, _, attr = name.rpartition(".")
        if module in self.norm_users:
            norm = self.model.get_submodule(module)
            check_shape(name, source, tensor, norm.weight.shape)
            norm.weight = nn.Parameter(torch.ones(norm.weight.shape, dtype=self.dtype, device=self.device),
                                       requires_grad=False)
            self.norms[module] = tensor.to(device=self.device, dtype=torch.float32)
            self.load_when_complete(self.norm_users[module])
            return
        layer, spec = self.model.get_submodule(module), self.specs[module]
        if spec.thudm:
            shapes = {"weight": (layer.out_features, layer.in_features * spec.bits // 8),
                      "weight_scale": (layer.out_features,)}
            kind_ok = tensor.dtype == torch.int8 if attr == "weight" else tensor.is_floating_point()
            if not kind_ok:
                raise InputError(f"{name} in {source} is {tensor.dtype}, but config.json's quantization_bit "
                                 f"{spec.bits} means THUDM's {'int8 codes' if attr == 'weight' else 'float scales'}; "
                                 f"the weights and config.json do not belong together")
        else:
            shapes = {"weight": (layer.out_features, layer.in_features)}
            if attr != "weight" or not tensor.is_floating_point():
                raise InputError(f"{name} in {source} is {tensor.dtype}, not a float weight; is config.json's "
                                 f"quantization_bit missing?")
        check_shape(name, source, tensor, shapes[attr])
        self.pending.setdefault(module, {})[attr] = tensor
        self.load_when_complete(module)

    def load_when_complete(self, module: str) -> None:
        spec, parts = self.specs[module], self.pending.get(module, {})
        if len(parts) < (2 if spec.thudm else 1) or (spec.norm and spec.norm not in self.norms):
            return
        layer = self.model.get_submodule(module)
        if spec.thudm:
            weight, scale = parts["weight"].to(self.device), parts["weight_scale"].to(self.device)
            stored = from_thudm(weight, scale, spec.bits, layer.group_size, self.dtype)
        elif spec.bits == 8:
            stored = quantize_int8(parts["weight"], self.dtype, self.device, self.norms.get(spec.norm))
        else:
            stored = quantize_int4(parts["weight"], layer.group_size, self.dtype, self.device, self.norms.get(spec.norm))
        if not spec.thudm:
            release_memory(parts["weight"])  # before the kernel's repacking needs its own temporaries
        del self.pending[module], parts
        layer.load(*stored, traceable=self.traceable)
        self.norms.pop(spec.norm, None)
        self.loaded.add(module)

    def missing(self) -> list[str]:
        """Checkpoint tensors never seen: THUDM's two per layer, or the float weight (a missing norm is reported with
        the other float parameters)."""
        names = []
        for module, spec in self.specs.items():
            if module not in self.loaded:
                attrs = ("weight", "weight_scale") if spec.thudm else ("weight",)
                names += [f"{module}.{attr}" for attr in attrs if attr not in self.pending.get(module, {})]
        return names


def describe(model: nn.Module) -> str:
    """", int4 weight-only (group 128), attention int8, output_layer int8" for a weight-only model (attention only
    where it differs from the MLP; ", int8 activations" where int8 layers round their inputs); "" for any other."""
    layer = model.transformer.encoder.layers[0]
    mlp, attention, output = layer.mlp.dense_h_to_4h, layer.self_attention.dense, model.get_submodule(OUTPUT_LAYER)
    if not isinstance(mlp, WeightOnlyLinear):
        return ""
    group = f" (group {mlp.group_size})" if mlp.bits == 4 else ""
    attention = f", attention int{attention.bits}" if attention.bits != mlp.bits else ""
    head = f"int{output.bits}" if isinstance(output, WeightOnlyLinear) else "float"
    rounds = any(isinstance(m, WeightOnlyLinear) and m.quantize_activations for m in model.modules())
    activations = ", int8 activations" if rounds else ""
    return f", int{mlp.bits} weight-only{group}{attention}, output_layer {head}{activations}"
