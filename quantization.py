"""W8A8 quantization with the file contract of Huawei's modelslim: calibration, the eight dicts, TP parts, inference.

Each file is a dict keyed by linear layer name (e.g. `transformer.encoder.layers.3.mlp.dense_h_to_4h`):

    quant_weight   int8  [out, in]  round(W / weight_scale): per output channel, symmetric
    weight_scale   fp32  [out]      max_k |W[n, k]| / 127
    weight_offset  fp32  [out]      zeros (symmetric)
    input_scale    fp32  [1]        per-tensor activation scale (asymmetric range)
    input_offset   fp32  [1]        the activation zero point, an integer in [-128, 127]
    deq_scale      fp32  [out]      input_scale * weight_scale (modelslim may store the fp32 bits in an int64)
    quant_bias     int32 [out]      round(fp_bias / deq_scale - input_offset * sum_k quant_weight[n, k])
    fp_bias        fp32  [out]      the float bias (zeros when the layer has none)

so that y = (clamp(round(x / input_scale + input_offset), -128, 127) @ quant_weight^T + quant_bias) * deq_scale.
With smoothing, `smoothed_norm_weight` holds the RMSNorm weights the smoothed layers expect (keyed by norm name).
Every dict is written as `NAME.npy` (a pickled dict, as modelslim writes and np.load reads) and `NAME.safetensors`;
the loader prefers safetensors and unpickles .npy files with an allowlist, never np.load(allow_pickle=True).
process_weights.py cuts them per rank into `tp{N}/quant_weight{i}`, `new_bias{i}`, `new_deq_scale{i}`.
"""
import importlib
import json
import math
import os
import pickle
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

import fused_ops
from atomic import atomic_directory, write_text_atomic
import checkpoint
from checkpoint import CheckpointReader, read_config
from errors import InputError
from tensor_parallel import ROW_PARALLEL, check_tp_config, split_tensor

FILE_NAMES = ("quant_weight", "weight_scale", "weight_offset", "input_scale", "input_offset", "deq_scale", "quant_bias",
              "fp_bias")
NORM_FILE = "smoothed_norm_weight"
PART_NAMES = ("quant_weight", "new_bias", "new_deq_scale")
PARTS_META = "quant_parts.json"
LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
# The layers whose input is an RMSNorm output, so a per-channel scale can be folded into the norm weight.
SMOOTHABLE = {"self_attention.query_key_value": "input_layernorm", "mlp.dense_h_to_4h": "post_attention_layernorm"}
ROUNDING_MAGIC = 1.5 * 2 ** 23  # fp32 values in [-2^22, 2^22] plus this land where the spacing is 1: rounded, half to even
# dtypes accepted when reading (modelslim's files included); deq_scale may be the int64 form
INT8, INT, FLOAT, DEQ = ("int8",), ("int32", "int64"), ("float16", "float32", "float64"), ("float32", "float64", "int64")


# ---------------------------------------------------------------------------------------------------------- files

def _numpy_module(name: str):
    # numpy 2 renamed numpy.core to numpy._core; a pickle names whichever its writer had
    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ModuleNotFoundError:
        return importlib.import_module(f"numpy.core.{name}")


# Everything a pickled dict of numpy arrays needs, whichever numpy wrote it; nothing that can run code.
SAFE_GLOBALS = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("builtins", "dict"): dict}
for _package in ("numpy.core", "numpy._core"):
    SAFE_GLOBALS[(f"{_package}.multiarray", "_reconstruct")] = _numpy_module("multiarray")._reconstruct
    SAFE_GLOBALS[(f"{_package}.multiarray", "scalar")] = _numpy_module("multiarray").scalar
    SAFE_GLOBALS[(f"{_package}.numeric", "_frombuffer")] = _numpy_module("numeric")._frombuffer


class ForbiddenGlobal(pickle.UnpicklingError):
    pass


class ArrayDictUnpickler(pickle.Unpickler):
    """An unpickler that resolves only SAFE_GLOBALS: a crafted .npy cannot import or call anything else."""

    def find_class(self, module: str, name: str):
        if (module, name) not in SAFE_GLOBALS:
            raise ForbiddenGlobal(f"{module}.{name}")
        return SAFE_GLOBALS[(module, name)]

    def persistent_load(self, pid):
        raise ForbiddenGlobal(f"persistent id {pid!r}")


def read_npy_dict(file: Path) -> dict[str, np.ndarray]:
    """A dict of arrays saved with np.save (modelslim's format), unpickled with the allowlist."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with open(file, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            _, _, dtype = readers[version](f)
        except (ValueError, KeyError):
            raise InputError(f"{file} is not a .npy file (format 1.0 or 2.0); write it again") from None
        if dtype != object:
            raise InputError(f"{file} holds a plain {dtype} array, not the dict of arrays keyed by layer name that "
                             f"modelslim and export_quant_weight.py write")
        try:
            holder = ArrayDictUnpickler(f).load()
        except ForbiddenGlobal as error:
            raise InputError(f"{file} asks the unpickler for {error}, which a dict of numpy arrays never needs; refusing "
                             f"to load it (it may be malicious). Export the weights again or use the .safetensors copy") from None
        except Exception as error:
            raise InputError(f"{file} is damaged ({error.__class__.__name__}: {error}); write it again") from None
    arrays = holder.item() if isinstance(holder, np.ndarray) and holder.shape == () else holder
    if not isinstance(arrays, dict) or not all(isinstance(key, str) for key in arrays):
        raise InputError(f"{file} does not hold a dict keyed by layer name")
    arrays = {key: np.asarray(value) for key, value in arrays.items()}
    bad = [key for key, value in arrays.items() if value.dtype.kind not in "iuf"]
    if bad:
        raise InputError(f"{file}: entry {bad[0]} is not a numeric array")
    return arrays


class SafetensorsDict(Mapping):
    """A .safetensors file as a read-only dict that reads an array only when asked, so one layer at a time is in memory."""

    def __init__(self, file: Path):
        self.file = file
        try:
            with safe_open(file, framework="np") as f:
                self._keys = list(f.keys())
        except (SafetensorError, OSError) as error:
            raise InputError(f"{file} is not a readable safetensors file ({error}); write it again") from None

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._keys:
            raise KeyError(key)
        with safe_open(self.file, framework="np") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def dict_file(directory: Path, name: str) -> Path | None:
    """NAME.safetensors if present (no pickle involved), else NAME.npy, else None."""
    for suffix in (".safetensors", ".npy"):
        if (directory / f"{name}{suffix}").is_file():
            return directory / f"{name}{suffix}"
    return None


def read_dict(directory: Path, name: str) -> Mapping[str, np.ndarray]:
    file = dict_file(directory, name)
    if file is None:
        raise InputError(f"{directory} lacks {name}.npy (and {name}.safetensors); export_quant_weight.py writes it")
    return SafetensorsDict(file) if file.suffix == ".safetensors" else read_npy_dict(file)


def write_dict(directory: Path, name: str, arrays: dict[str, np.ndarray]) -> None:
    """NAME.npy, loadable by np.load(allow_pickle=True) as modelslim's files are, and NAME.safetensors."""
    holder = np.empty((), dtype=object)
    holder[()] = arrays
    with open(directory / f"{name}.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(holder))
        # protocol 5 pickles each array from its own buffer; np.save's protocol 4 would copy them all first
        pickle.dump(holder, f, protocol=5)
    save_file({key: np.ascontiguousarray(value) for key, value in arrays.items()}, directory / f"{name}.safetensors")


def decode_deq_scale(deq_scale: np.ndarray) -> np.ndarray:
    """fp32 as is; modelslim's int64 form holds the fp32 bit pattern (sign-extended): its low 32 bits are the float."""
    if deq_scale.dtype == np.int64:
        return (deq_scale & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
    return deq_scale.astype(np.float32)


def missing_files(quant_path: Path) -> list[str]:
    return [f"{name}.npy" for name in FILE_NAMES if dict_file(quant_path, name) is None]


def check_quant_files(quant_path: Path) -> None:
    missing = missing_files(quant_path)
    if missing:
        raise InputError(f"QUANT_WEIGHT_PATH {quant_path} lacks {', '.join(missing)}; it needs all eight files that "
                         f"export_quant_weight.py writes")


def files_fingerprint(directory: Path, names: tuple[str, ...]) -> str:
    """Identifies the dict files `names` in directory (both forms) by names, sizes and times, without reading them."""
    return checkpoint.files_fingerprint(directory / f"{name}{suffix}" for name in names for suffix in (".safetensors", ".npy")
                                        if (directory / f"{name}{suffix}").is_file())


def quant_fingerprint(quant_path: Path) -> str:
    """Identifies the eight files the TP parts were cut from."""
    return files_fingerprint(quant_path, FILE_NAMES)


# ----------------------------------------------------------------------------------------------------------- math

def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weight and fp32 scale per output channel, symmetric: weight ~ quant_weight * scale[:, None]."""
    scale = weight.float().abs().amax(dim=1).clamp(min=1e-8) / 127
    return torch.round(weight.float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def activation_qparams(low: float, high: float) -> tuple[float, float]:
    """Per-tensor asymmetric (scale, offset) mapping [low, high] onto [-128, 127]; the range always holds 0, so that
    0 is exact."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = float(np.float32(max((high - low) / 255, 1e-8)))
    return scale, float(np.clip(round(-128 - low / scale), -128, 127))


def quantize_activation(x: torch.Tensor, input_scale: float, input_offset: float) -> torch.Tensor:
    """clamp(round(x / input_scale + input_offset), -128, 127) as int8; in fp32 so bf16/fp16 inputs round alike.

    Clamping first, then adding and subtracting 1.5 * 2^23, rounds exactly as torch.round (half to even), without its
    CPU kernel: round, floor and trunc enter the thread pool even for one token's row, and on a busy machine every
    such entry waits for a descheduled thread (it doubled the int8 decode step when another process held a core).
    """
    clamped = torch.clamp(x.float() / input_scale + input_offset, -128, 127)
    return ((clamped + ROUNDING_MAGIC) - ROUNDING_MAGIC).to(torch.int8)


def quantize_linear(weight: torch.Tensor, bias: torch.Tensor | None, low: float, high: float) -> dict[str, np.ndarray]:
    """The eight arrays of one layer from its float weight, bias and calibrated input range."""
    input_scale, input_offset = activation_qparams(low, high)
    quant_weight, weight_scale = quantize_weight(weight)
    fp_bias = torch.zeros(weight.shape[0]) if bias is None else bias.float().cpu()
    weight_scale = weight_scale.cpu()
    deq_scale = weight_scale * input_scale
    row_sums = quant_weight.sum(dim=1, dtype=torch.int64).cpu().double()
    quant_bias = torch.round(fp_bias.double() / deq_scale.double() - input_offset * row_sums).to(torch.int32)
    return {"quant_weight": quant_weight.cpu().numpy(), "weight_scale": weight_scale.numpy(),
            "weight_offset": np.zeros(weight.shape[0], np.float32),
            "input_scale": np.array([input_scale], np.float32), "input_offset": np.array([input_offset], np.float32),
            "deq_scale": deq_scale.numpy(), "quant_bias": quant_bias.numpy(), "fp_bias": fp_bias.numpy()}


def prune_weight(weight: torch.Tensor, input_norms: torch.Tensor, pattern: str, sparsity: float = 0.5) -> torch.Tensor:
    """Wanda: zero the weights of lowest score |W_ij| * ||X_j|| (X_j: input channel j over the calibration tokens),
    compared within each output row, with no weight update. pattern "unstructured" zeros round(sparsity * in) per row;
    "2:4" zeros 2 of every 4 consecutive inputs (the pattern sparse int8 kernels take; sparsity is then 0.5)."""
    out_features, in_features = weight.shape
    score = weight.abs() * input_norms[None, :]
    if pattern == "2:4":
        if in_features % 4:
            raise InputError(f"2:4 sparsity needs input sizes divisible by 4; a layer has {in_features}")
        groups = score.reshape(out_features, in_features // 4, 4)
        drop = groups.topk(2, dim=-1, largest=False).indices
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False).reshape(out_features, in_features)
    else:
        drop = score.topk(round(sparsity * in_features), dim=1, largest=False).indices
        keep = torch.ones_like(score, dtype=torch.bool).scatter_(1, drop, False)
    return weight * keep


def smooth_scales(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant: s_j = max|X_j|^alpha / max|W_j|^(1-alpha); X / s and W * s compute the same product, with the
    activation outliers moved into the weights, which are quantized per channel."""
    weight_absmax = weight.abs().amax(dim=0).clamp(min=1e-5)
    return (act_absmax.clamp(min=1e-5).pow(alpha) / weight_absmax.pow(1 - alpha)).clamp(min=1e-5)


class RangeObserver:
    """The range of one layer's input over all calibration tokens: min/max, or the `percentile` (nearest rank) at each
    end. With the number of values known up front, the percentile is exact from the k most extreme values per side.
    Also each input channel's L2 norm over the tokens, the ||X_j|| of Wanda pruning (--sparse)."""

    def __init__(self, total_values: int, percentile: float | None = None):
        self.keep = None if percentile is None else max(1, math.ceil(total_values * (100 - percentile) / 100))
        self.low = self.high = None
        self.square_sums = None

    def observe(self, x: torch.Tensor) -> None:
        channels = x.detach().reshape(-1, x.shape[-1]).float()
        squares = channels.square().sum(0)
        self.square_sums = squares if self.square_sums is None else self.square_sums + squares
        x = channels.reshape(-1)
        if self.keep is None:
            low, high = x.min(), x.max()
            self.low = low if self.low is None else torch.minimum(self.low, low)
            self.high = high if self.high is None else torch.maximum(self.high, high)
            return
        self.high = self._top(x, self.high)
        self.low = self._top(-x, self.low)  # the negated smallest values

    def _top(self, x: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
        values = x if kept is None else torch.cat((kept, x))
        return values.topk(min(self.keep, values.numel())).values

    def range(self) -> tuple[float, float]:
        if self.keep is None:
            return float(self.low), float(self.high)
        return -float(self.low.min()), float(self.high.min())

    def channel_norms(self) -> torch.Tensor:
        return self.square_sums.sqrt()


# ------------------------------------------------------------------------------------------------------ layers

def quantized_layer_names(config) -> list[str]:
    """Every linear layer of the blocks not in float_layers_id; output_layer always stays float."""
    return [f"transformer.encoder.layers.{i}.{linear}" for i in range(config.num_layers)
            if i not in set(config.float_layers_id) for linear in LINEARS]


def full_shape(config, layer: str) -> tuple[int, int]:
    """[out, in] of a layer's weight in the whole (not tensor-parallel) model."""
    hidden, ffn = config.hidden_size, config.ffn_hidden_size
    q_size = config.num_attention_heads * config.kv_channels
    shapes = {"self_attention.query_key_value": (q_size + 2 * config.kv_groups * config.kv_channels, hidden),
              "self_attention.dense": (hidden, q_size), "mlp.dense_h_to_4h": (2 * ffn, hidden),
              "mlp.dense_4h_to_h": (hidden, ffn)}
    return shapes[layer.split(".", 4)[4]]


def layer_array(arrays: Mapping[str, np.ndarray], layer: str, source: Path, shape: tuple[int, ...],
                dtypes: tuple[str, ...]) -> np.ndarray:
    """One layer's entry, checked: present, of one of `dtypes`, with `shape` (vectors stored as [n, 1] and scalars
    as [] are accepted and reshaped)."""
    if layer not in arrays:
        raise InputError(f"{source} has no entry for {layer}: the quantized weights do not cover the layers config.json's "
                         f"float_layers_id leaves quantized; export them again for this checkpoint")
    array = np.asarray(arrays[layer])
    if array.dtype.name not in dtypes:
        raise InputError(f"{layer} in {source} is {array.dtype}, but this file holds {' or '.join(dtypes)}; it is not "
                         f"the quantized-weights dict it is named after")
    if array.shape != shape and not (len(shape) == 1 and array.size == shape[0]):
        raise InputError(f"{layer} in {source} has shape {array.shape} but this checkpoint needs {shape}; the quantized "
                         f"weights were made for another model (or another tp size)")
    return array.reshape(shape)


def split_quant_layer(layer: str, weight: torch.Tensor, bias: torch.Tensor, deq_scale: torch.Tensor, config,
                      tp_size: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(quant_weight, bias, deq_scale) per rank, by tensor_parallel's rules: column-parallel layers split the weight
    rows and the per-row vectors alike; row-parallel layers split the weight columns and keep deq_scale whole, and the
    bias (which already holds the offset term of every column) goes to rank 0 only, as the partial sums are added."""
    weights = split_tensor(f"{layer}.weight", weight, config, tp_size)
    if f"{layer}.weight".endswith(ROW_PARALLEL):
        return [(w, bias if rank == 0 else torch.zeros_like(bias), deq_scale) for rank, w in enumerate(weights)]
    biases = split_tensor(f"{layer}.bias", bias, config, tp_size)
    deq_scales = split_tensor(f"{layer}.bias", deq_scale, config, tp_size)
    return list(zip(weights, biases, deq_scales))


def write_quant_parts(model_path: str | Path, quant_path: str | Path, tp_size: int, show_progress: bool = True) -> Path:
    """{quant_path}/tp{N}/quant_weight{i}, new_bias{i}, new_deq_scale{i} for every rank i, as the reference's
    process_weights.py writes them (deq_scale decoded to fp32), plus quant_parts.json naming their source."""
    from modeling_chatglm_ascend import ChatGLM2Config

    quant_path = Path(quant_path)
    config = ChatGLM2Config.from_dict(read_config(model_path))
    check_tp_config(config, tp_size)
    check_quant_files(quant_path)
    fingerprint = quant_fingerprint(quant_path)
    sources = {name: read_dict(quant_path, name) for name in ("quant_weight", "quant_bias", "deq_scale")}
    parts = {name: [{} for _ in range(tp_size)] for name in PART_NAMES}
    for layer in tqdm(quantized_layer_names(config), desc=f"splitting quantized weights for tp {tp_size}", unit="layer",
                      disable=not show_progress):
        out_features, in_features = full_shape(config, layer)
        weight = layer_array(sources["quant_weight"], layer, quant_path / "quant_weight", (out_features, in_features), INT8)
        bias = layer_array(sources["quant_bias"], layer, quant_path / "quant_bias", (out_features,), INT)
        deq_scale = decode_deq_scale(layer_array(sources["deq_scale"], layer, quant_path / "deq_scale", (out_features,), DEQ))
        pieces = split_quant_layer(layer, torch.tensor(weight, dtype=torch.int8), torch.tensor(bias, dtype=torch.int32),
                                   torch.tensor(deq_scale), config, tp_size)
        for rank, rank_pieces in enumerate(pieces):
            for name, piece in zip(PART_NAMES, rank_pieces):
                parts[name][rank][layer] = piece.numpy()
    with atomic_directory(quant_path / f"tp{tp_size}") as tmp:
        for rank in range(tp_size):
            for name in PART_NAMES:
                write_dict(tmp, f"{name}{rank}", parts[name][rank])
        write_text_atomic(tmp / PARTS_META, json.dumps({"tp_size": tp_size, "source_fingerprint": fingerprint}) + "\n")
    return quant_path / f"tp{tp_size}"


# --------------------------------------------------------------------------------------------------- inference

def env_switch(name: str) -> bool:
    """An on/off environment variable: 1 on; 0, empty or unset off; anything else is refused."""
    flag = os.environ.get(name, "0").strip()
    if flag not in ("", "0", "1"):
        raise InputError(f"{name}={flag!r}: use 1 to turn it on, or 0 (or unset) to leave it off")
    return flag == "1"


def quant_path_from_env() -> Path | None:
    """QUANT_WEIGHT_PATH when ENABLE_QUANT=1 or ENABLE_SPARSE=1 (sparse quantization is W8A8 on pruned weights),
    after checking that it holds the eight files; None when both are 0 or unset."""
    switch = "ENABLE_SPARSE=1" if env_switch("ENABLE_SPARSE") else "ENABLE_QUANT=1" if env_switch("ENABLE_QUANT") else None
    if switch is None:
        return None
    if not os.environ.get("QUANT_WEIGHT_PATH"):
        raise InputError(f"{switch} needs QUANT_WEIGHT_PATH, the folder export_quant_weight.py wrote; "
                         f"export QUANT_WEIGHT_PATH=... (or unset {switch.split('=')[0]} for float)")
    quant_path = Path(os.environ["QUANT_WEIGHT_PATH"])
    if not quant_path.is_dir():
        raise InputError(f"QUANT_WEIGHT_PATH {quant_path} does not exist; run export_quant_weight.py first")
    check_quant_files(quant_path)
    return quant_path


def inference_quant_path(model_path: str | Path, tp_size: int) -> Path | None:
    """quant_path_from_env(), after checking that process_weights.py cut its parts for tp_size from the files there
    now (before the long float load)."""
    quant_path = quant_path_from_env()
    if quant_path is None:
        return None
    redo = (f"run: ENABLE_QUANT=1 QUANT_WEIGHT_PATH={quant_path} python process_weights.py --model_path {model_path} "
            f"--tp_size {tp_size}")
    meta_file = quant_path / f"tp{tp_size}" / PARTS_META
    if not meta_file.is_file():
        made = sorted(p.name for p in quant_path.glob("tp*") if (p / PARTS_META).is_file())
        raise InputError(f"{quant_path} has no quantized parts for tp_size {tp_size}"
                         f"{' (only ' + ', '.join(made) + ')' if made else ''}; {redo}")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise InputError(f"{meta_file} is damaged; {redo}") from None
    if meta.get("tp_size") != tp_size:
        raise InputError(f"{meta_file.parent} was written for tp_size {meta.get('tp_size')}; {redo}")
    if meta.get("source_fingerprint") != quant_fingerprint(quant_path):
        raise InputError(f"{meta_file.parent} was cut from other quantized weights than {quant_path} holds now; {redo}")
    return quant_path


class QuantLinear(nn.Module):
    """W8A8 linear: x quantized per tensor, an int8 x int8 -> int32 matmul, + quant_bias, * deq_scale."""

    def __init__(self, weight: torch.Tensor, quant_bias: torch.Tensor, deq_scale: torch.Tensor, input_scale: float,
                 input_offset: float):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.input_scale, self.input_offset = input_scale, input_offset
        self.register_buffer("quant_bias", quant_bias)
        self.register_buffer("deq_scale", deq_scale)
        self.packed_weight = None
        if fused_ops.can_pack_quant_weight(weight):
            # CPU: only the prepacked copy is kept (the raw one would double the memory), with the bias folded for it.
            self.packed_weight = fused_ops.pack_quant_weight(weight)
            folded = deq_scale.double() * (quant_bias.double() + input_offset * weight.sum(1, dtype=torch.float64))
            self.register_buffer("folded_bias", folded.float())
            weight = None
        # int8 [out, in] as stored; weight.t() is the column-major [in, out] operand the int8 kernels are fastest on
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = quantize_activation(x.reshape(-1, self.in_features), self.input_scale, self.input_offset)
        if self.packed_weight is not None:
            y = fused_ops.packed_quant_matmul(x_q, self.packed_weight, self.input_offset, self.folded_bias,
                                              self.deq_scale, x.dtype)
        else:
            y = fused_ops.quant_matmul(x_q, self.weight.t(), self.quant_bias, self.deq_scale, x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, input_scale={self.input_scale:.4g}, " \
               f"input_offset={self.input_offset:g}"


def quantize_model(model: nn.Module, quant_path: Path,
                   quant_weights: tuple[Mapping[str, np.ndarray], Path] | None = None) -> None:
    """Swap this rank's quantized layers for QuantLinear (the float weights are loaded already) and put in the
    smoothed RMSNorm weights, from {quant_path}/tp{N}/ and the per-tensor input parameters. quant_weights (a dict
    and its path, for messages) replaces tp{N}/quant_weight{rank}: ENABLE_SPARSE's decompressed weights."""
    rank, part_dir = model.tp_rank, quant_path / f"tp{model.tp_size}"
    biases, deq_scales = (read_dict(part_dir, f"{name}{rank}") for name in PART_NAMES[1:])
    weights, weights_source = quant_weights or (read_dict(part_dir, f"quant_weight{rank}"), part_dir / f"quant_weight{rank}")
    input_scales, input_offsets = read_dict(quant_path, "input_scale"), read_dict(quant_path, "input_offset")
    for layer in quantized_layer_names(model.config):
        linear = model.get_submodule(layer)
        shape = (linear.out_features, linear.in_features)
        weight = layer_array(weights, layer, weights_source, shape, INT8)
        bias = layer_array(biases, layer, part_dir / f"new_bias{rank}", shape[:1], INT)
        deq_scale = decode_deq_scale(layer_array(deq_scales, layer, part_dir / f"new_deq_scale{rank}", shape[:1], DEQ))
        input_scale = layer_array(input_scales, layer, quant_path / "input_scale", (1,), FLOAT)
        input_offset = layer_array(input_offsets, layer, quant_path / "input_offset", (1,), FLOAT + INT)
        quant = QuantLinear(torch.tensor(weight, dtype=torch.int8), torch.tensor(bias, dtype=torch.int32),
                            torch.tensor(deq_scale), float(input_scale[0]), float(input_offset[0]))
        parent, _, child = layer.rpartition(".")
        setattr(model.get_submodule(parent), child, quant.to(model.device))
    if dict_file(quant_path, NORM_FILE) is not None:
        norms = read_dict(quant_path, NORM_FILE)
        for name in norms:
            try:
                norm = model.get_submodule(name)
            except AttributeError:
                norm = None
            if not hasattr(norm, "eps"):  # an RMSNorm
                raise InputError(f"{quant_path / NORM_FILE} names {name}, which is no RMSNorm of this model")
            weight = layer_array(norms, name, quant_path / NORM_FILE, tuple(norm.weight.shape), FLOAT)
            norm.weight = nn.Parameter(torch.tensor(weight).to(model.device, model.dtype), requires_grad=False)


# ----------------------------------------------------------------------------------------------------- export

@contextmanager
def input_hooks(module: nn.Module, observers: dict[str, Callable[[torch.Tensor], None]]) -> Iterator[None]:
    """Call observers[name](input) whenever the submodule `name` runs."""
    def hook(observe: Callable[[torch.Tensor], None]) -> Callable:
        def pre_hook(_, args: tuple) -> None:  # returns None: a pre-hook's return value would replace the input
            observe(args[0])
        return pre_hook

    handles = [module.get_submodule(name).register_forward_pre_hook(hook(observe)) for name, observe in observers.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def load_block(config, read: CheckpointReader, index: int, device: torch.device) -> nn.Module:
    """Layer `index` in fp32 on `device`, alone."""
    from modeling_chatglm_ascend import GLMBlock

    with torch.device("meta"):
        block = GLMBlock(config, 1)
    for name, param in list(block.named_parameters()):
        full_name = f"transformer.encoder.layers.{index}.{name}"
        tensor = read(full_name)
        if tuple(tensor.shape) != tuple(param.shape):
            raise InputError(f"{full_name} has shape {tuple(tensor.shape)} but config.json implies {tuple(param.shape)}")
        module_name, _, attr = name.rpartition(".")
        setattr(block.get_submodule(module_name), attr,
                nn.Parameter(tensor.to(device=device, dtype=torch.float32), requires_grad=False))
    return block


def write_quant_dir(out_dir: Path, dicts: dict[str, dict[str, np.ndarray]]) -> None:
    """All the dicts into out_dir at once; an existing folder is replaced only if it holds quantized weights."""
    holds_quant = out_dir.is_dir() and dict_file(out_dir, "quant_weight") is not None
    if out_dir.exists() and not holds_quant and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"--quant_weight {out_dir} exists and holds no quantized weights; it would be replaced, so "
                         f"choose a new or empty folder")
    with atomic_directory(out_dir) as tmp:
        for name, arrays in dicts.items():
            write_dict(tmp, name, arrays)


@torch.inference_mode()
def export(float_path: str | Path, prompts: list[list[int]], out_dir: str | Path, smooth: bool = True,
           alpha: float = 0.5, percentile: float | None = None, device: torch.device = torch.device("cpu"),
           show_progress: bool = True, sparse_pattern: str | None = None, sparsity: float = 0.5) -> None:
    """Calibrate on `prompts` (token ids) and write the eight dicts (and the smoothed norm weights) to out_dir.
    With sparse_pattern ("unstructured" or "2:4"), each weight is pruned (prune_weight, after smoothing, with the
    input norms of the same calibration pass) before it is quantized, so quant_weight holds the pruned zeros.

    Layer by layer: the hidden states of every prompt go through one float block at a time, loaded alone, so memory
    is one layer plus the activations plus the int8 result. With smoothing, a first pass measures each input channel's
    max |x| of the norm-fed layers, the scales are folded into the norm and the weight, and a second pass records the
    input ranges of all four layers and gives the next block's input.
    """
    from modeling_chatglm_ascend import ChatGLM2Config

    config = ChatGLM2Config.from_dict(read_config(float_path))
    read = CheckpointReader(float_path)
    if not prompts:
        raise InputError("no calibration prompts; the data file must hold at least one question")
    embedding = read("transformer.embedding.word_embeddings.weight")
    if max(max(ids) for ids in prompts) >= embedding.shape[0]:
        raise InputError("the calibration prompts hold token ids beyond the checkpoint's vocabulary; is the tokenizer "
                         "from another model?")
    hidden = [embedding[torch.tensor(ids)][None].to(device=device, dtype=torch.float32) for ids in prompts]
    del embedding
    longest, tokens = max(len(ids) for ids in prompts), sum(len(ids) for ids in prompts)
    cos, sin = fused_ops.rotary_tables(longest, config.kv_channels // 2, 10000.0 * config.rope_ratio, device)

    def run(block: nn.Module) -> list[torch.Tensor]:
        return [block(h, cos[None, :h.shape[1]], sin[None, :h.shape[1]], None, None, 0) for h in hidden]

    dicts = {name: {} for name in FILE_NAMES}
    norms = {}
    float_layers = set(config.float_layers_id)
    for index in tqdm(range(config.num_layers), desc="calibrating", unit="layer", disable=not show_progress):
        block = load_block(config, read, index, device)
        prefix = f"transformer.encoder.layers.{index}."
        if index in float_layers:
            hidden = run(block)
            continue
        if smooth:
            absmax = {name: torch.zeros(block.get_submodule(name).in_features, device=device) for name in SMOOTHABLE}

            def channel_absmax(name: str) -> Callable[[torch.Tensor], None]:
                return lambda x: torch.maximum(absmax[name], x.abs().reshape(-1, x.shape[-1]).amax(0), out=absmax[name])

            with input_hooks(block, {name: channel_absmax(name) for name in SMOOTHABLE}):
                run(block)
            for name, norm_name in SMOOTHABLE.items():
                linear, norm = block.get_submodule(name), block.get_submodule(norm_name)
                scales = smooth_scales(absmax[name], linear.weight, alpha)
                norm.weight.div_(scales)
                linear.weight.mul_(scales)
                norms[prefix + norm_name] = norm.weight.cpu().numpy()
        observers = {name: RangeObserver(tokens * block.get_submodule(name).in_features, percentile) for name in LINEARS}
        with input_hooks(block, {name: observer.observe for name, observer in observers.items()}):
            hidden = run(block)
        for name, observer in observers.items():
            linear = block.get_submodule(name)
            weight = linear.weight if sparse_pattern is None else \
                prune_weight(linear.weight, observer.channel_norms(), sparse_pattern, sparsity)
            for file_name, array in quantize_linear(weight, linear.bias, *observer.range()).items():
                dicts[file_name][prefix + name] = array
    if norms:
        dicts[NORM_FILE] = norms
    write_quant_dir(Path(out_dir), dicts)
