"""Sparse int8 weights: this project's own compressed format for generate_compress_weight.py and ENABLE_SPARSE=1.

Huawei's 300I Duo feeds the compressed bytes to a hardware decompressor whose format is not public, so this format is
our own. For every rank i of one tp size, COMPRESS_WEIGHT_PATH/compress{i}/ holds

    values.safetensors  int8, per layer: the kept weights in row-major order
    index.safetensors   uint8, per layer: where they go (see compress_layer)
    info.json           format and version, tp size, rank, a fingerprint of the source tp{N}/quant_weight{i} file,
                        and per layer the shape, pattern, nonzero count and sha256 of the values and index bytes

Two patterns, picked per layer from the weights themselves:
    "2:4"      every group of 4 consecutive inputs of a row holds at most 2 nonzeros: values [out, in/2] (the 2 kept
               entries of each group, in order) and 2-bit positions, one nibble (i0 | i1 << 2) per group, two groups
               per byte (low nibble first) over the row-major groups: 4 bits per group, as NVIDIA's 2:4 metadata
    "bitmask"  anything else: values [nnz] and np.packbits of the nonzero mask, row-major, [ceil(out*in / 8)]
Decompression rebuilds quant_weight exactly, at load, so memory and arithmetic then equal W8A8's.
"""
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors.numpy import save_file

from chatglm2.atomic import atomic_directory, honour_umask, write_text_atomic
from chatglm2.errors import InputError
from chatglm2.quant_files import PARTS_META, SafetensorsDict, dict_file, files_fingerprint, read_dict

FORMAT, VERSION = "chatglm2-sparse-int8", 1
INFO, VALUES, INDEX = "info.json", "values.safetensors", "index.safetensors"


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def is_2_4(weight: np.ndarray) -> bool:
    """At most 2 nonzeros in every group of 4 consecutive inputs (quantization may round a kept weight to 0)."""
    return weight.shape[1] % 4 == 0 and ((weight.reshape(-1, 4) != 0).sum(1) <= 2).all()


def compress_layer(weight: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
    """(pattern, values, index) of an int8 [out, in] weight."""
    if is_2_4(weight):
        groups = weight.reshape(-1, 4)
        # the nonzero positions first (stable sort), padded with zero positions when a group has fewer than 2
        positions = np.sort(np.argsort(groups == 0, axis=1, kind="stable")[:, :2], axis=1)
        values = np.take_along_axis(groups, positions, axis=1).reshape(weight.shape[0], -1)
        nibbles = (positions[:, 0] | positions[:, 1] << 2).astype(np.uint8)
        nibbles = np.append(nibbles, np.zeros(len(nibbles) % 2, np.uint8))
        return "2:4", values, nibbles[0::2] | nibbles[1::2] << 4
    mask = weight != 0
    return "bitmask", weight[mask], np.packbits(mask.reshape(-1))


def decompress_layer(pattern: str, shape: tuple[int, int], values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The int8 weight compress_layer was given; raises InputError when the arrays do not fit the shape."""
    out_features, in_features = shape
    size = out_features * in_features
    if pattern == "2:4" and values.size == size // 2 and index.size == (size // 4 + 1) // 2 and in_features % 4 == 0:
        nibbles = np.stack((index & 0xF, index >> 4), axis=1).reshape(-1)[:size // 4]
        positions = np.stack((nibbles & 3, nibbles >> 2), axis=1).astype(np.int64)
        groups = np.zeros((size // 4, 4), np.int8)
        np.put_along_axis(groups, positions, values.reshape(-1, 2), axis=1)
        return groups.reshape(shape)
    if pattern == "bitmask" and index.size == (size + 7) // 8:
        mask = np.unpackbits(index, count=size).astype(bool)
        if mask.sum() == values.size:
            weight = np.zeros(size, np.int8)
            weight[mask] = values
            return weight.reshape(shape)
    raise InputError(f"compressed {pattern!r} data of {values.size} values and {index.size} index bytes does not fit "
                     f"shape {shape}; generate the compressed weights again")


# --------------------------------------------------------------------------------------------------- writing

def find_parts(weight_path: Path, tp_size: int | None = None) -> tuple[Path, int]:
    """(tp{N} folder, N) for generate_compress_weight.py: weight_path is QUANT_WEIGHT_PATH (its one tp{N}/, or
    tp{tp_size}/ when it holds several) or a tp{N}/ folder itself."""
    redo = "run process_weights.py with ENABLE_SPARSE=1 (and QUANT_WEIGHT_PATH) first"
    if (weight_path / PARTS_META).is_file():
        part_dir = weight_path
    else:
        made = sorted(p for p in weight_path.glob("tp*") if (p / PARTS_META).is_file())
        if tp_size is not None:
            part_dir = weight_path / f"tp{tp_size}"
            if part_dir not in made:
                raise InputError(f"{weight_path} has no parts for tp_size {tp_size}; {redo}")
        elif len(made) == 1:
            part_dir = made[0]
        elif not made:
            raise InputError(f"--weight_path {weight_path} holds no tp{{N}}/ parts (nor is one); {redo}")
        else:
            raise InputError(f"--weight_path {weight_path} holds parts for {', '.join(p.name for p in made)}; choose "
                             f"one with --tp_size, or pass {made[0]} itself")
    try:
        parts_tp = json.loads((part_dir / PARTS_META).read_text(encoding="utf-8"))["tp_size"]
    except (json.JSONDecodeError, KeyError):
        raise InputError(f"{part_dir / PARTS_META} is damaged; {redo}") from None
    if tp_size is not None and parts_tp != tp_size:
        raise InputError(f"{part_dir} holds parts for tp_size {parts_tp}, not {tp_size}")
    missing = [f"quant_weight{i}" for i in range(parts_tp) if dict_file(part_dir, f"quant_weight{i}") is None]
    if missing:
        raise InputError(f"{part_dir} lacks {', '.join(missing)} of tp_size {parts_tp}; {redo}")
    return part_dir, parts_tp


def write_compressed(weight_path: str | Path, save_path: str | Path, tp_size: int | None = None) -> list[dict]:
    """compress{i}/ for every rank of the parts find_parts picks, written into save_path at once (an existing folder
    is replaced only if it holds compressed weights). Returns per rank {"dense_bytes", "compressed_bytes"}."""
    part_dir, parts_tp = find_parts(Path(weight_path), tp_size)
    save_path = Path(save_path)
    if save_path.exists() and not (save_path / "compress0" / INFO).is_file() and \
            (not save_path.is_dir() or any(save_path.iterdir())):
        raise InputError(f"--save_path {save_path} exists and holds no compressed weights; it would be replaced, so "
                         f"choose a new or empty folder")
    sizes = []
    with atomic_directory(save_path) as tmp:
        for rank in range(parts_tp):
            weights = read_dict(part_dir, f"quant_weight{rank}")
            values, index, layers = {}, {}, {}
            for layer in weights:
                weight = np.asarray(weights[layer])
                if weight.dtype != np.int8 or weight.ndim != 2:
                    raise InputError(f"{layer} in {part_dir / f'quant_weight{rank}'} is {weight.dtype} {weight.shape}, "
                                     f"not an int8 matrix")
                pattern, values[layer], index[layer] = compress_layer(weight)
                layers[layer] = {"shape": list(weight.shape), "pattern": pattern, "nonzeros": int(np.count_nonzero(weight)),
                                 "values_sha256": _sha256(values[layer]), "index_sha256": _sha256(index[layer])}
            dense = sum(np.asarray(weights[layer]).nbytes for layer in weights)
            compressed = sum(values[layer].nbytes + index[layer].nbytes for layer in weights)
            if compressed >= dense:
                raise InputError(f"{part_dir / f'quant_weight{rank}'} is not sparse: compressed it would take "
                                 f"{compressed} bytes for {dense} dense; export with --sparse")
            rank_dir = tmp / f"compress{rank}"
            rank_dir.mkdir()
            for name, arrays in ((VALUES, values), (INDEX, index)):
                save_file(arrays, rank_dir / name)
                honour_umask(rank_dir / name)
            info = {"format": FORMAT, "version": VERSION, "tp_size": parts_tp, "rank": rank,
                    "source": {"file": dict_file(part_dir, f"quant_weight{rank}").name,
                               "fingerprint": files_fingerprint(part_dir, (f"quant_weight{rank}",))},
                    "layers": layers}
            write_text_atomic(rank_dir / INFO, json.dumps(info, indent=1) + "\n")
            sizes.append({"dense_bytes": dense, "compressed_bytes": compressed})
    return sizes


# --------------------------------------------------------------------------------------------------- loading

def read_info(compress_path: Path, rank: int, tp_size: int, part_dir: Path) -> dict:
    """compress{rank}/info.json, checked against the format, the tp size and the source file as it is now."""
    redo = (f"run: python generate_compress_weight.py --weight_path {part_dir.parent} --save_path {compress_path} "
            f"--tp_size {tp_size}")
    file = compress_path / f"compress{rank}" / INFO
    if not file.is_file():
        raise InputError(f"COMPRESS_WEIGHT_PATH {compress_path} lacks compress{rank}/{INFO} for tp_size {tp_size}; {redo}")
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{file} is damaged; {redo}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("version") != VERSION:
        raise InputError(f"{file} is not {FORMAT} version {VERSION}; {redo}")
    if info.get("tp_size") != tp_size or info.get("rank") != rank:
        raise InputError(f"{compress_path} was compressed for tp_size {info.get('tp_size')}, not {tp_size}; {redo}")
    if info.get("source", {}).get("fingerprint") != files_fingerprint(part_dir, (f"quant_weight{rank}",)):
        raise InputError(f"{compress_path} was compressed from other quantized weights than {part_dir} holds now "
                         f"(another checkpoint, another export, or parts cut again); {redo}")
    return info


def check_compressed(compress_path: Path, quant_path: Path, tp_size: int) -> None:
    """compress_path holds every rank's info record and readable files made from quant_path's tp{tp_size} parts
    (checked before the long float load)."""
    if not compress_path.is_dir():
        raise InputError(f"COMPRESS_WEIGHT_PATH {compress_path} does not exist; run generate_compress_weight.py first")
    extra = compress_path / f"compress{tp_size}"
    if extra.is_dir():
        raise InputError(f"{compress_path} holds {extra.name}/, so it was compressed for a larger tp_size than "
                         f"{tp_size}; compress the tp{tp_size} parts into another folder")
    for rank in range(tp_size):
        read_info(compress_path, rank, tp_size, quant_path / f"tp{tp_size}")
        for name in (VALUES, INDEX):
            SafetensorsDict(compress_path / f"compress{rank}" / name)  # raises for a truncated or unreadable file


class CompressedWeights(Mapping):
    """One rank's quant_weight dict, decompressed a layer at a time when asked, after checking the sha256 checksums."""

    def __init__(self, compress_path: Path, rank: int, tp_size: int, part_dir: Path):
        self.dir = compress_path / f"compress{rank}"
        self.layers = read_info(compress_path, rank, tp_size, part_dir)["layers"]
        self.values, self.index = SafetensorsDict(self.dir / VALUES), SafetensorsDict(self.dir / INDEX)

    def __getitem__(self, layer: str) -> np.ndarray:
        entry = self.layers[layer]
        if layer not in self.values or layer not in self.index:
            raise InputError(f"{self.dir} has no compressed data for {layer}; generate the compressed weights again")
        values, index = self.values[layer], self.index[layer]
        if _sha256(values) != entry["values_sha256"] or _sha256(index) != entry["index_sha256"]:
            raise InputError(f"{self.dir}: the compressed data of {layer} does not match the checksum in {INFO}; the "
                             f"files are corrupted, generate the compressed weights again")
        return decompress_layer(entry["pattern"], tuple(entry["shape"]), values, index)

    def __contains__(self, layer: object) -> bool:  # Mapping's default would decompress the layer to answer
        return layer in self.layers

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


def rank_weights(compress_path: Path, quant_path: Path, rank: int, tp_size: int) -> tuple[CompressedWeights, Path]:
    """This rank's decompressed quant_weight dict and its folder, for the W8A8 loader."""
    weights = CompressedWeights(compress_path, rank, tp_size, quant_path / f"tp{tp_size}")
    return weights, weights.dir
