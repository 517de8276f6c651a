"""How ChatGLM2's tensors are cut for tensor parallelism (the reference's process_weights.py rules) and joined back.

Rank i gets: query heads chunk i with KV group i*kv_tp//tp (groups replicated beyond kv_tp = min(tp, groups)); its own
gate and up halves of dense_h_to_4h; columns i of the row-parallel self_attention.dense and dense_4h_to_h; rows i of
the vocab-parallel output_layer; everything else whole.
"""
import hashlib
import json
from pathlib import Path

import torch

from errors import InputError

ROW_PARALLEL = ("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")


def part_root(model_path: str | Path, tp_size: int) -> Path:
    return Path(model_path) / f"tensor_parallel_tp{tp_size}" / "part_model"


def source_fingerprint(model_path: str | Path) -> str:
    """Identifies the float weights a part was cut from: names, sizes and times of the weight files."""
    from checkpoint import weight_files
    digest = hashlib.sha256()
    for file in sorted(set(weight_files(model_path).values())):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def check_tp_config(config, tp_size: int) -> None:
    """tp_size must divide the heads, the FFN width and the vocabulary, and fit the KV groups."""
    groups = config.kv_groups
    for what, size in (("attention heads", config.num_attention_heads), ("ffn_hidden_size", config.ffn_hidden_size),
                       ("padded_vocab_size", config.padded_vocab_size)):
        if size % tp_size:
            raise InputError(f"--tp_size {tp_size} does not divide the {size} {what} of this model; choose a divisor")
    if (groups % tp_size) if tp_size <= groups else (tp_size % groups):
        raise InputError(f"--tp_size {tp_size} cannot share {groups} KV groups evenly; use a divisor or multiple of {groups}")


def part_model_dir(model_path: str | Path, tp_size: int, tp_rank: int) -> Path:
    """This rank's part, after checking that every rank's part exists and was cut from these weights for tp_size."""
    root = part_root(model_path, tp_size)
    redo = f"run: python process_weights.py --model_path {model_path} --tp_size {tp_size}"
    fingerprint = source_fingerprint(model_path)
    for rank in range(tp_size):
        config_file = root / str(rank) / "config.json"
        if not config_file.is_file():
            raise InputError(f"tensor-parallel part {root / str(rank)} is missing; {redo}")
        part = json.loads(config_file.read_text(encoding="utf-8"))
        if part.get("world_size") != tp_size or part.get("tp_rank") != rank:
            raise InputError(f"{root / str(rank)} was written for another tp size; {redo}")
        if part.get("source_fingerprint") != fingerprint:
            raise InputError(f"{root / str(rank)} was cut from other weights than {model_path} holds now; {redo}")
    return root / str(tp_rank)


def _qkv_sizes(config, rows: int) -> tuple[int, int]:
    q_size = config.num_attention_heads * config.kv_channels
    return q_size, (rows - q_size) // 2


def split_tensor(name: str, tensor: torch.Tensor, config, tp_size: int) -> list[torch.Tensor]:
    """The tp_size pieces of one full tensor, in rank order (clones, so saving one saves only its piece)."""
    if "query_key_value" in name:
        q_size, kv_size = _qkv_sizes(config, tensor.shape[0])
        q, k, v = tensor.split([q_size, kv_size, kv_size], dim=0)
        kv_tp = min(tp_size, config.kv_groups)
        qs, ks, vs = q.chunk(tp_size, 0), k.chunk(kv_tp, 0), v.chunk(kv_tp, 0)
        return [torch.cat((qs[i], ks[i * kv_tp // tp_size], vs[i * kv_tp // tp_size])) for i in range(tp_size)]
    if "dense_h_to_4h" in name:
        chunks = tensor.chunk(2 * tp_size, dim=0)
        return [torch.cat((chunks[i], chunks[i + tp_size])) for i in range(tp_size)]
    if name.endswith(ROW_PARALLEL):
        return [piece.clone() for piece in tensor.chunk(tp_size, dim=1)]
    if name.endswith("output_layer.weight"):
        return [piece.clone() for piece in tensor.chunk(tp_size, dim=0)]
    return [tensor] * tp_size


def join_tensor(name: str, pieces: list[torch.Tensor], config) -> torch.Tensor:
    """The inverse of split_tensor."""
    tp_size = len(pieces)
    if "query_key_value" in name:
        kv_tp = min(tp_size, config.kv_groups)
        q_local = config.num_attention_heads * config.kv_channels // tp_size
        kv_local = (pieces[0].shape[0] - q_local) // 2
        splits = [piece.split([q_local, kv_local, kv_local], dim=0) for piece in pieces]
        owners = [next(i for i in range(tp_size) if i * kv_tp // tp_size == j) for j in range(kv_tp)]
        return torch.cat([s[0] for s in splits] + [splits[i][1] for i in owners] + [splits[i][2] for i in owners])
    if "dense_h_to_4h" in name:
        halves = [piece.chunk(2, dim=0) for piece in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    if name.endswith(ROW_PARALLEL):
        return torch.cat(pieces, dim=1)
    if name.endswith("output_layer.weight"):
        return torch.cat(pieces, dim=0)
    return pieces[0]
