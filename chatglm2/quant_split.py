"""process_weights.py for W8A8: cut the eight dicts into each rank's quant_weight{i}, new_bias{i}, new_deq_scale{i}."""
import json
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from chatglm2.atomic import atomic_directory, write_text_atomic
from chatglm2.checkpoint import read_config
from chatglm2.config import ChatGLM2Config
from chatglm2.model import GLMBlock
from chatglm2.quant_files import (
    DEQ,
    INT,
    INT8,
    PART_NAMES,
    PARTS_META,
    check_quant_files,
    decode_deq_scale,
    layer_array,
    quant_fingerprint,
    quantized_layer_names,
    read_dict,
    write_dict,
)
from chatglm2.tensor_parallel import ROW_PARALLEL, check_tp_config, split_tensor


def full_shape(block: nn.Module, layer: str) -> tuple[int, int]:
    """[out, in] of a layer's weight in the whole model, as a (meta) block of tp_size 1 defines it."""
    return tuple(block.get_submodule(layer.split(".", 4)[4]).weight.shape)


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
    quant_path = Path(quant_path)
    config = ChatGLM2Config.from_dict(read_config(model_path))
    check_tp_config(config, tp_size)
    check_quant_files(quant_path)
    with torch.device("meta"):
        block = GLMBlock(config, tp_size=1)
    fingerprint = quant_fingerprint(quant_path)
    sources = {name: read_dict(quant_path, name) for name in ("quant_weight", "quant_bias", "deq_scale")}
    parts = {name: [{} for _ in range(tp_size)] for name in PART_NAMES}
    for layer in tqdm(quantized_layer_names(config), desc=f"splitting quantized weights for tp {tp_size}", unit="layer",
                      disable=not show_progress):
        out_features, in_features = full_shape(block, layer)
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

