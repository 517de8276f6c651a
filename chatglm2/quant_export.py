"""Making W8A8 weights (export_quant_weight.py): calibration, SmoothQuant smoothing, Wanda pruning, quantization.

The model is run one block at a time on the calibration prompts, so memory is one float layer plus the activations;
the result is written in quant_files' format.
"""
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from chatglm2.atomic import atomic_directory
from chatglm2.checkpoint import CheckpointReader, read_config
from chatglm2.config import ChatGLM2Config
from chatglm2.errors import InputError
from chatglm2.model import Attend, GLMBlock
from chatglm2.ops import rotary_tables
from chatglm2.quant_files import FILE_NAMES, LINEARS, NORM_FILE, dict_file, write_dict

# The layers whose input is an RMSNorm output, so a per-channel scale can be folded into the norm weight.
SMOOTHABLE = {"self_attention.query_key_value": "input_layernorm", "mlp.dense_h_to_4h": "post_attention_layernorm"}


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


def load_block(config: ChatGLM2Config, read: CheckpointReader, index: int, device: torch.device) -> nn.Module:
    """Layer `index` in fp32 on `device`, alone."""
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
    config = ChatGLM2Config.from_dict(read_config(float_path))
    if config.quantization_bit:
        raise InputError(f"{float_path} is THUDM's int{config.quantization_bit} checkpoint (quantization_bit in "
                         f"config.json); W8A8 is calibrated from the float checkpoint, pass that as --float_weight")
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
    cos, sin = rotary_tables(longest, config.kv_channels // 2, 10000.0 * config.rope_ratio, device)

    def run(block: nn.Module) -> list[torch.Tensor]:
        return [block(h, cos[None, :h.shape[1]], sin[None, :h.shape[1]], Attend(), None) for h in hidden]

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
