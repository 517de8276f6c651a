"""Filling a model built on the meta device: float tensors as they stream from the checkpoint, then W8A8 layers.

Nothing is held twice: each tensor is assigned as it streams in, and the float weights of W8A8 layers are never read,
because those layers are QuantLinear from the start. Weight-only layers (weight_only.py) are WeightOnlyLinear from the
start too: their float weights are quantized one tensor at a time as they stream in, so the float model never exists.
"""
import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from chatglm2 import ops, settings
from chatglm2.checkpoint import check_shape, iter_tensors, read_config, weight_files
from chatglm2.compiled import compile_enabled
from chatglm2.config import ChatGLM2Config
from chatglm2.device import default_dtype, select_device
from chatglm2.errors import InputError
from chatglm2.memory import GiB, check_fits, check_kv_cache_fits, kv_cache_advice, kv_cache_bytes, module_bytes
from chatglm2.ops import RMSNorm
from chatglm2.quant_files import (DEQ, FLOAT, INT, INT8, NORM_FILE, PART_NAMES, check_quant_parts, decode_deq_scale,
                                  dict_file, layer_array, quantized_layer_names, read_dict)
from chatglm2.quant_linear import QuantLinear
from chatglm2.sparse_format import check_compressed, rank_weights
from chatglm2.tensor_parallel import check_tp_config, part_model_dir
from chatglm2.weight_only import DEFAULT_GROUP_SIZE, WeightOnlyLoader, plan_layers, use_weight_only_layers

ROPE_BYTES_PER_POSITION = 2 * 4  # the cos and sin tables hold fp32 values, kv_channels // 4 of each per position


def load_pretrained(cls: type, path: str | Path, device: str | torch.device | None, dtype: torch.dtype | None,
                    tp_rank: int, tp_size: int, max_seq_len: int | None, quant_path: str | Path | None,
                    compress_path: str | Path | None, show_progress: bool, quantize: str | None = None,
                    group_size: int = DEFAULT_GROUP_SIZE, quantize_output_layer: str | None = "auto", compile: str = "auto",
                    quantize_attention: str = "auto", quantize_activations: str | None = None,
                    kv_cache_tokens: int | None = None) -> nn.Module:
    """ChatGLM2ForCausalLM.from_pretrained: every input checked (and the memory estimated) before the long load.
    quantize ("int8", "int4"), group_size, quantize_output_layer ("auto", "int8", "int4", None), quantize_attention
    ("auto", "int8", "int4") and quantize_activations ("int8", None): weight-only quantization at load
    (weight_only.py); a THUDM quantized checkpoint loads as weight-only without quantize. kv_cache_tokens: the
    size of the KV cache to check with the weights (default MAX_SEQ_LEN, one sequence)."""
    if not isinstance(device, torch.device):
        device = select_device(device or "auto", tp_rank)
    dtype = dtype or default_dtype(device)
    max_seq_len = max_seq_len or settings.max_seq_len()
    compress_path = Path(compress_path) if compress_path else settings.compress_path()
    quant_path = Path(quant_path) if quant_path else settings.quant_path()
    config = ChatGLM2Config.from_dict(read_config(path))
    check_tp_config(config, tp_size)
    weight_only = plan_layers(config, quantize, group_size, quantize_output_layer, w8a8=quant_path is not None,
                              quantize_attention=quantize_attention, quantize_activations=quantize_activations)
    if compress_path and not quant_path:
        raise InputError("sparse weights (COMPRESS_WEIGHT_PATH) need their W8A8 parts too: pass quant_path "
                         "(QUANT_WEIGHT_PATH)")
    if quant_path:
        check_quant_parts(quant_path, path, tp_size)
    if compress_path:
        check_compressed(compress_path, quant_path, tp_size)
    weights_dir = part_model_dir(path, tp_size, tp_rank) if tp_size > 1 else Path(path)
    quant_layers = quantized_layer_names(config) if quant_path else []
    kv_cache_tokens = kv_cache_tokens or max_seq_len
    check_kv_cache_fits(config, kv_cache_tokens, max_seq_len, tp_size, dtype, device)
    check_memory(cls, config, tp_size, max_seq_len, kv_cache_tokens, device, dtype, lower_bound=True)
    with torch.device("meta"):
        model = cls(config, tp_rank, tp_size, max_seq_len)
        use_quant_layers(model, quant_layers)
        use_weight_only_layers(model, weight_only, dtype)
    check_memory(model, config, tp_size, max_seq_len, kv_cache_tokens, device, dtype)
    model.compile = compile_enabled(compile, device)
    load_float_weights(model, weights_dir, device, dtype, set(quant_layers), show_progress,
                       WeightOnlyLoader(model, weight_only, device, dtype, traceable=model.compile))
    if quant_path:
        load_quant_weights(model, config, quant_path, tp_rank, tp_size, compress_path, device, dtype,
                           pack=not model.compile)
    model.rope_cos, model.rope_sin = ops.rotary_tables(max_seq_len, config.kv_channels // 2,
                                                       10000.0 * config.rope_ratio, device)
    if not model.compile:  # inductor compiles plain linears; oneDNN's prepacked weights are opaque to it
        ops.pack_linears(model)  # last: only plain float nn.Linear layers are repacked
    return model.eval()


def check_memory(model: nn.Module | type, config: ChatGLM2Config, tp_size: int, max_seq_len: int,
                 kv_cache_tokens: int, device: torch.device, dtype: torch.dtype, lower_bound: bool = False) -> None:
    """Weights, rotary tables and a KV cache of kv_cache_tokens tokens must fit together. With lower_bound, `model` is
    the class and only one layer is built (on meta) and counted at half a byte per parameter, the least any weight
    format takes (int4): a config.json with an absurd num_layers is refused before a meta model of that size is
    built."""
    if lower_bound:
        with torch.device("meta"):
            one_layer = model(dataclasses.replace(config, num_layers=1), 0, tp_size, 1)
        weights = config.num_layers * module_bytes(one_layer.transformer.encoder.layers[0], torch.int8) // 2
    else:
        weights = module_bytes(model, dtype)
    kv_cache = kv_cache_bytes(config, kv_cache_tokens, tp_size, dtype)
    needed = weights + max_seq_len * ROPE_BYTES_PER_POSITION * config.kv_channels // 4 + kv_cache
    lower_cache = kv_cache_advice(kv_cache_tokens, max_seq_len)
    lower_weights = "use a quantized model or more tensor-parallel devices (or check num_layers in config.json)"
    # the larger part first: that is what to lower
    advice = f"{lower_cache}, or {lower_weights}" if kv_cache > weights else f"{lower_weights}, or {lower_cache}"
    check_fits(f"the model (weights{' at least' if lower_bound else ''} {weights / GiB:.2f} GiB, the KV cache of "
               f"{kv_cache_tokens} tokens {kv_cache / GiB:.2f} GiB)", needed, device,
               advice)


def use_quant_layers(model: nn.Module, layers: list[str]) -> None:
    """Swap the float linears named in `layers` for empty QuantLinear layers (call while the model is on meta)."""
    for layer in layers:
        linear = model.get_submodule(layer)
        parent, _, child = layer.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantLinear(linear.in_features, linear.out_features))


def load_float_weights(model: nn.Module, weights_dir: Path, device: torch.device, dtype: torch.dtype,
                       skip_modules: set[str], show_progress: bool, weight_only: WeightOnlyLoader) -> None:
    """Assign every float parameter from the checkpoint, tensor by tensor; tensors of `skip_modules` (the W8A8
    layers) are passed over without being read, and the weights of weight-only layers go to `weight_only`."""
    expected = dict(model.named_parameters())
    loaded = set()
    names = weight_files(weights_dir)
    wanted = [name for name in names if name.rpartition(".")[0] not in skip_modules]
    for name, tensor in tqdm(iter_tensors(weights_dir, wanted), total=len(wanted), desc="loading weights",
                             unit="tensor", disable=not show_progress):
        if name.endswith("rotary_pos_emb.inv_freq"):
            continue  # derived from the config
        if weight_only.takes(name):
            weight_only.take(name, tensor, weights_dir)
            loaded.add(name)
            continue
        if name not in expected:
            raise InputError(f"{weights_dir} holds tensor {name}, which ChatGLM2 does not have; is this another model?")
        check_shape(name, weights_dir, tensor, expected[name].shape)
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr,
                nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
        loaded.add(name)
    missing = sorted(set(expected) - loaded) + weight_only.missing()
    if missing:
        raise InputError(f"{weights_dir} lacks {len(missing)} tensor(s), e.g. {missing[0]}; the checkpoint is incomplete")


def load_quant_weights(model: nn.Module, config, quant_path: Path, tp_rank: int, tp_size: int,
                       compress_path: Path | None, device: torch.device, dtype: torch.dtype, pack: bool = True) -> None:
    """Fill this rank's QuantLinear layers from {quant_path}/tp{N}/ and the per-tensor input parameters, and put in
    the smoothed RMSNorm weights. With compress_path, the int8 weights come decompressed from ENABLE_SPARSE's folder."""
    part_dir = quant_path / f"tp{tp_size}"
    biases, deq_scales = (read_dict(part_dir, f"{name}{tp_rank}") for name in PART_NAMES[1:])
    weights: Mapping[str, np.ndarray]
    if compress_path is not None:
        weights, weights_source = rank_weights(compress_path, quant_path, tp_rank, tp_size)
    else:
        weights, weights_source = read_dict(part_dir, f"quant_weight{tp_rank}"), part_dir / f"quant_weight{tp_rank}"
    input_scales, input_offsets = read_dict(quant_path, "input_scale"), read_dict(quant_path, "input_offset")
    for layer in quantized_layer_names(config):
        quant = model.get_submodule(layer)
        shape = (quant.out_features, quant.in_features)
        weight = layer_array(weights, layer, weights_source, shape, INT8)
        bias = layer_array(biases, layer, part_dir / f"new_bias{tp_rank}", shape[:1], INT)
        deq_scale = decode_deq_scale(layer_array(deq_scales, layer, part_dir / f"new_deq_scale{tp_rank}", shape[:1], DEQ))
        input_scale = layer_array(input_scales, layer, quant_path / "input_scale", (1,), FLOAT)
        input_offset = layer_array(input_offsets, layer, quant_path / "input_offset", (1,), FLOAT + INT)
        quant.load(torch.tensor(weight, dtype=torch.int8, device=device),
                   torch.tensor(bias, dtype=torch.int32, device=device),
                   torch.tensor(deq_scale, device=device), float(input_scale[0]), float(input_offset[0]), pack)
    if dict_file(quant_path, NORM_FILE) is not None:
        norms = read_dict(quant_path, NORM_FILE)
        for name in norms:
            try:
                norm = model.get_submodule(name)
            except AttributeError:
                norm = None
            if not isinstance(norm, RMSNorm):
                raise InputError(f"{quant_path / NORM_FILE} names {name}, which is no RMSNorm of this model")
            weight = layer_array(norms, name, quant_path / NORM_FILE, tuple(norm.weight.shape), FLOAT)
            norm.weight = nn.Parameter(torch.tensor(weight).to(device, dtype), requires_grad=False)
