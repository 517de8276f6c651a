"""W8A8 weights on disk, in the file contract of Huawei's modelslim: the eight dicts, their TP parts, safe reading.

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
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from chatglm2 import checkpoint
from chatglm2.atomic import honour_umask
from chatglm2.errors import InputError

FILE_NAMES = ("quant_weight", "weight_scale", "weight_offset", "input_scale", "input_offset", "deq_scale", "quant_bias",
              "fp_bias")
NORM_FILE = "smoothed_norm_weight"
PART_NAMES = ("quant_weight", "new_bias", "new_deq_scale")
PARTS_META = "quant_parts.json"
LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
# dtypes accepted when reading (modelslim's files included); deq_scale may be the int64 form
INT8, INT, FLOAT, DEQ = ("int8",), ("int32", "int64"), ("float16", "float32", "float64"), ("float32", "float64", "int64")

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
        if dtype != np.dtype(object):
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
    honour_umask(directory / f"{name}.safetensors")


def decode_deq_scale(deq_scale: np.ndarray) -> np.ndarray:
    """fp32 as is; modelslim's int64 form holds the fp32 bit pattern (sign-extended): its low 32 bits are the float."""
    if deq_scale.dtype == np.int64:
        return (deq_scale & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
    return deq_scale.astype(np.float32)


def missing_files(quant_path: Path) -> list[str]:
    return [f"{name}.npy" for name in FILE_NAMES if dict_file(quant_path, name) is None]


def check_quant_files(quant_path: Path) -> None:
    if not quant_path.is_dir():
        raise InputError(f"QUANT_WEIGHT_PATH {quant_path} does not exist; run export_quant_weight.py first")
    missing = missing_files(quant_path)
    if missing:
        raise InputError(f"QUANT_WEIGHT_PATH {quant_path} lacks {', '.join(missing)}; it needs all eight files that "
                         f"export_quant_weight.py writes")


def files_fingerprint(directory: Path, names: tuple[str, ...]) -> str:
    """Identifies the dict files `names` in directory (both forms) by their content (see checkpoint.files_fingerprint)."""
    return checkpoint.files_fingerprint(directory / f"{name}{suffix}" for name in names for suffix in (".safetensors", ".npy")
                                        if (directory / f"{name}{suffix}").is_file())


def quant_fingerprint(quant_path: Path) -> str:
    """Identifies the eight files the TP parts were cut from."""
    return files_fingerprint(quant_path, FILE_NAMES)


def quantized_layer_names(config) -> list[str]:
    """Every linear layer of the blocks not in float_layers_id; output_layer always stays float."""
    return [f"transformer.encoder.layers.{i}.{linear}" for i in range(config.num_layers)
            if i not in set(config.float_layers_id) for linear in LINEARS]


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


def check_quant_parts(quant_path: Path, model_path: str | Path, tp_size: int) -> None:
    """The eight files are in quant_path and process_weights.py cut its parts for tp_size from them as they are now
    (checked before the long float load)."""
    check_quant_files(quant_path)
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
