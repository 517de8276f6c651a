"""How ChatGLM2's tensors are cut for tensor parallelism (the reference's process_weights.py rules) and joined back.

Rank i gets: query heads chunk i with KV group i*kv_tp//tp (groups replicated beyond kv_tp = min(tp, groups)); its own
gate and up halves of dense_h_to_4h; columns i of the row-parallel self_attention.dense and dense_4h_to_h; rows i of
the vocab-parallel output_layer; everything else whole.
"""
import filecmp
import json
import re
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm import tqdm

from chatglm2.atomic import atomic_directory
from chatglm2.checkpoint import (
    INDEX_FILES,
    SINGLE_FILES,
    TOKENIZER_FILES,
    files_fingerprint,
    iter_shards,
    read_config,
    save_shard,
    shard_file_name,
    tensor_names,
    weight_files,
    write_config_and_tokenizer,
    write_index,
)
from chatglm2.config import ChatGLM2Config
from chatglm2.errors import InputError

ROW_PARALLEL = ("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")


def part_root(model_path: str | Path, tp_size: int) -> Path:
    return Path(model_path) / f"tensor_parallel_tp{tp_size}" / "part_model"


def source_fingerprint(model_path: str | Path) -> str:
    """Identifies the float weights a part was cut from by their content (see files_fingerprint), so a copy of a
    checkpoint with its parts still loads."""
    return files_fingerprint(sorted(set(weight_files(model_path).values())))


def check_tp_config(config: ChatGLM2Config, tp_size: int) -> None:
    """tp_size must divide the heads, the FFN width and the vocabulary, and fit the KV groups."""
    groups = config.kv_groups
    for what, size in (("attention heads", config.num_attention_heads), ("ffn_hidden_size", config.ffn_hidden_size),
                       ("padded_vocab_size", config.padded_vocab_size)):
        if size % tp_size:
            raise InputError(f"--tp_size {tp_size} does not divide the {size} {what} of this model; choose a divisor")
    if (groups % tp_size) if tp_size <= groups else (tp_size % groups):
        raise InputError(f"--tp_size {tp_size} cannot share {groups} KV groups evenly; use a divisor or multiple of {groups}")


def has_float_weights(model_path: str | Path) -> bool:
    return any((Path(model_path) / name).is_file() for name in INDEX_FILES + SINGLE_FILES)


def part_model_dir(model_path: str | Path, tp_size: int, tp_rank: int) -> Path:
    """This rank's part, after checking that every rank's part exists and was cut for tp_size from the same weights
    (the weights in model_path, where they are there; a folder made with --output_path holds only the parts)."""
    root = part_root(model_path, tp_size)
    redo = f"run: python process_weights.py --model_path {model_path} --tp_size {tp_size}"
    fingerprints = {source_fingerprint(model_path)} if has_float_weights(model_path) else set()
    for rank in range(tp_size):
        config_file = root / str(rank) / "config.json"
        if not config_file.is_file():
            raise InputError(f"tensor-parallel part {root / str(rank)} is missing; {redo}")
        part = read_config(root / str(rank))
        if part.get("world_size") != tp_size or part.get("tp_rank") != rank:
            raise InputError(f"{root / str(rank)} was written for another tp size; {redo}")
        fingerprints.add(part.get("source_fingerprint"))
        if len(fingerprints) > 1:
            raise InputError(f"{root / str(rank)} was cut from other weights than {model_path} holds now; {redo}")
    return root / str(tp_rank)


def _qkv_sizes(config: ChatGLM2Config, rows: int) -> tuple[int, int]:
    q_size = config.num_attention_heads * config.kv_channels
    return q_size, (rows - q_size) // 2


def split_tensor(name: str, tensor: torch.Tensor, config: ChatGLM2Config, tp_size: int) -> list[torch.Tensor]:
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


def join_tensor(name: str, pieces: list[torch.Tensor], config: ChatGLM2Config) -> torch.Tensor:
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


def check_output_folder(output_path: Path, model_path: str | Path, config: dict) -> None:
    """--output_path must be new, empty, or made by this function from the same checkpoint before: tensor_parallel_tp*
    folders beside a config.json and tokenizer files equal to the ones it writes. Anything else would lose the user's
    own files or put these parts beside another model's tokenizer."""
    if not output_path.exists():
        return
    if not output_path.is_dir():
        raise InputError(f"--output_path {output_path} exists and is not a folder; choose a new or empty folder")

    def written_here(entry: Path) -> bool:
        if entry.name == "config.json":
            try:
                return json.loads(entry.read_text(encoding="utf-8")) == config
            except (OSError, ValueError):
                return False
        if entry.name in TOKENIZER_FILES:
            source = Path(model_path) / entry.name
            return source.is_file() and entry.is_file() and filecmp.cmp(entry, source, shallow=False)
        return entry.is_dir() and re.fullmatch(r"tensor_parallel_tp\d+", entry.name) is not None

    foreign = sorted(entry.name for entry in output_path.iterdir() if not written_here(entry))
    if foreign:
        raise InputError(f"--output_path {output_path} already holds {', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}, which process_weights.py did not write there from "
                         f"{model_path}; choose a new or empty folder")


def write_tp_parts(model_path: str | Path, tp_size: int, output_path: str | Path | None = None,
                   show_progress: bool = True) -> Path:
    """Cut the float checkpoint into tp_size loadable parts, one source shard at a time (memory ~ one shard).

    Parts go to {output_path or model_path}/tensor_parallel_tp{N}/part_model/{rank}/ and appear only when all are
    written. An --output_path folder also gets config.json and the tokenizer, so it works as main.py's --model_path
    (it must be new, empty or such a folder already: see check_output_folder).
    """
    config_dict = read_config(model_path)
    config = ChatGLM2Config.from_dict(config_dict)
    check_tp_config(config, tp_size)
    files = sorted(set(weight_files(model_path).values()))
    for file in files:
        tensor_names(file)  # a truncated or damaged shard is refused before any part folder is made
    fingerprint = source_fingerprint(model_path)
    out_root = Path(output_path or model_path)
    separate = out_root.resolve() != Path(model_path).resolve()
    if separate:
        check_output_folder(out_root, model_path, config_dict)
    part_configs = [dict(config_dict, world_size=tp_size, tp_rank=rank, source_fingerprint=fingerprint)
                    for rank in range(tp_size)]
    with ExitStack() as stack:
        tmp_parts = [stack.enter_context(atomic_directory(part_root(out_root, tp_size) / str(rank)))
                     for rank in range(tp_size)]
        weight_map, total_size = {}, 0
        for k, (file, shard) in enumerate(tqdm(iter_shards(model_path), total=len(files), unit="shard",
                                               desc=f"splitting for tp {tp_size}", disable=not show_progress), start=1):
            pieces = [{} for _ in range(tp_size)]
            for name, tensor in shard.items():
                if name.endswith("rotary_pos_emb.inv_freq"):
                    continue
                for rank, piece in enumerate(split_tensor(name, tensor, config, tp_size)):
                    pieces[rank][name] = piece
                weight_map[name] = shard_file_name(k, len(files), safetensors=True)
                total_size += tensor.numel() * tensor.element_size() // tp_size
            for rank in range(tp_size):
                save_shard(tmp_parts[rank] / shard_file_name(k, len(files), safetensors=True), pieces[rank])
            del shard, pieces
        for rank in range(tp_size):
            write_config_and_tokenizer(tmp_parts[rank], part_configs[rank], model_path)
            if len(files) > 1:
                write_index(tmp_parts[rank], weight_map, total_size, safetensors=True)
    if separate:
        write_config_and_tokenizer(out_root, config_dict, model_path)
    return part_root(out_root, tp_size)
