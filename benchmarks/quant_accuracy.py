"""W8A8 and weight-only accuracy against float on a random checkpoint with planted activation outliers.

    python -m benchmarks.quant_accuracy [--work_dir DIR] [--hidden_size 512] [--num_layers 4] [--weight_only]

Random weights at the usual init scale (std 1/sqrt(fan_in), so every layer matters to the logits), and, as real LLMs
have, a few hidden channels 50x larger than the rest: the RMSNorm weights of those channels are scaled by 50 in every
layer, so the inputs of query_key_value and dense_h_to_4h carry the outliers, and the weight columns that read them
are divided by 50, so the float model computes what it did without them (large activations meet small weights, as
in trained LLMs; without that the outliers would saturate every attention softmax). Calibration on some lines of the
tokenizer corpus, evaluation on others (a few hundred tokens): cosine similarity of each position's logits to
float's and top-1 agreement, both in fp32 so that only quantization differs. The sparse rows (export --sparse, then
generate_compress_weight.py and ENABLE_SPARSE=1) also give the compressed size over the dense int8 size. Random
weights have no redundancy to prune, so they show the cost of pruning at its worst, not what a trained model loses.
Weight-only rows: --quantize int8 / int4 as loaded (norm weights folded into the layers they feed; with
--quantize_activations int8 the int8 layers also round each input row to 8 bits), THUDM's int8 / int4 checkpoints
written from the same weights (no folding: their layers meet the outliers), and, as what a peer computes on these
weights, chatglm.cpp's Q8_0 / Q4_0 rounding (its converter's formulas, dequantized into a float model here, not run
through chatglm.cpp): on the encoder linears only (against our rounding of those layers without the norm folding),
and as its converter writes a model (every 2-D weight: the embeddings and output_layer too; against our default
load, which quantizes output_layer as well). The FFN width is a multiple of 128 so
that int4 groups of 128 fit.
Results go to benchmarks/results/.
"""
import argparse
import json
import math
import tempfile
from pathlib import Path

import torch

from chatglm2 import sparse_format
from chatglm2.checkpoint import iter_tensors, write_checkpoint
from chatglm2.quant_export import export
from chatglm2.quant_split import write_quant_parts
from chatglm2.random_checkpoint import CORPUS, demo_config, random_shards, train_tokenizer
from chatglm2.weight_only import (DEFAULT_GROUP_SIZE, ENCODER_LINEARS, quantize_int4, quantize_int8,
                                  write_thudm_checkpoint)
from chatglm2.weight_only_linear import dequantize
from modeling_chatglm_ascend import ChatGLM2ForCausalLM, ChatGLM2Tokenizer

ROOT = Path(__file__).resolve().parent.parent

OUTLIER_CHANNELS, OUTLIER_SCALE = 4, 50.0
CALIBRATION_LINES, EVAL_LINES = range(0, 600, 20), range(7, 2077, 97)  # disjoint


def outlier_checkpoint(path: Path, hidden_size: int, num_layers: int) -> None:
    """A ChatGLM2 checkpoint with init-scale random weights and outlier channels planted in the norm weights."""
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        train_tokenizer(Path(tokenizer_dir))
        vocab = ChatGLM2Tokenizer.from_pretrained(tokenizer_dir).vocab_size
        config = demo_config(num_layers, hidden_size, ffn_hidden_size=128 * round(hidden_size * 27 / 8 / 128),
                             num_attention_heads=8,
                             padded_vocab_size=64 * math.ceil(vocab / 64))
        generator = torch.Generator().manual_seed(1)
        outliers = torch.randperm(hidden_size, generator=generator)[:OUTLIER_CHANNELS]
        shard = {}
        for part in random_shards(config, 1, torch.float32, seed=0):
            shard.update(part)
        for name, tensor in shard.items():
            if name.endswith("weight") and tensor.dim() == 2 and "word_embeddings" not in name:
                shard[name] = tensor * (1 / math.sqrt(tensor.shape[1])) / 0.02  # std 0.02 -> 1/sqrt(fan_in)
            if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
                shard[name][outliers] *= OUTLIER_SCALE
        for name, tensor in shard.items():
            if name.endswith(("query_key_value.weight", "dense_h_to_4h.weight")):
                tensor[:, outliers] /= OUTLIER_SCALE
        write_checkpoint(path, config, [{k: v.half() for k, v in shard.items()}], 1, tokenizer_dir)


def corpus_lines(indices: range) -> list[str]:
    lines = [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [lines[i] for i in indices if i < len(lines)]


def logits(model: ChatGLM2ForCausalLM, prompts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([model(ids[None])[0] for ids in prompts])


def compare(reference: torch.Tensor, other: torch.Tensor) -> dict:
    cosine = torch.nn.functional.cosine_similarity(reference, other, dim=-1)
    return {"cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item(),
            "top1_agreement": (reference.argmax(-1) == other.argmax(-1)).float().mean().item()}


def quantized_logits(ckpt: Path, quant_dir: Path, prompts: list[torch.Tensor], dtype: torch.dtype,
                     compress_dir: Path | None = None) -> torch.Tensor:
    """W8A8 inference, or with compress_dir, sparse inference from the weights compressed there."""
    write_quant_parts(ckpt, quant_dir, 1, show_progress=False)
    if compress_dir:
        sparse_format.write_compressed(quant_dir, compress_dir)
    model = ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu", dtype=dtype, quant_path=quant_dir,
                                                compress_path=compress_dir)
    return logits(model, prompts).float()


def q8_0(weight: torch.Tensor) -> torch.Tensor:
    """chatglm.cpp's Q8_0 (convert.py quantize_q8_0): blocks of 32, scale = max|w| / 127, dequantized."""
    blocks = weight.reshape(-1, 32)
    scale = (blocks.abs().amax(-1, keepdim=True) / 127).half().float()
    return ((blocks / scale).round().clamp(-128, 127) * scale).view_as(weight)


def q4_0(weight: torch.Tensor) -> torch.Tensor:
    """chatglm.cpp's Q4_0 (convert.py quantize_q4_0): blocks of 32, scale = the signed value of largest magnitude / -8,
    codes round(w / scale + 8) clamped to 0..15, dequantized."""
    blocks = weight.reshape(-1, 32)
    peak = torch.take_along_dim(blocks, blocks.abs().argmax(-1, keepdim=True), -1)
    scale = (peak / -8).half().float()
    return (((blocks / scale + 8).round().clamp(0, 15) - 8) * scale).view_as(weight)


def int4_clip_searched(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE,
                       clips: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)) -> torch.Tensor:
    """Our int4 scheme (asymmetric, integer zero point) with each group's range shrunk by the clip, of these, that
    rounds the group closest to its weights (as llama.cpp's k-quants and AWQ search): an ablation, not what loads."""
    blocks = weight.reshape(-1, group_size)
    best, best_error = blocks, torch.full_like(blocks[:, :1], math.inf)
    for clip in clips:
        low, high = blocks.amin(-1, keepdim=True).clamp(max=0) * clip, blocks.amax(-1, keepdim=True).clamp(min=0) * clip
        scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float16).tiny).half().float()
        zero_point = torch.round(-low / scale).clamp(0, 15)
        rounded = ((blocks / scale + zero_point).round().clamp(0, 15) - zero_point) * scale
        error = (rounded - blocks).pow(2).sum(-1, keepdim=True)
        best = torch.where(error < best_error, rounded, best)
        best_error = torch.minimum(error, best_error)
    return best.view_as(weight)

def encoder_linear(name: str, tensor: torch.Tensor) -> bool:
    return name.endswith(".weight") and name.rpartition(".")[0].endswith(ENCODER_LINEARS)


def matrix(name: str, tensor: torch.Tensor) -> bool:
    """What chatglm.cpp's converter rounds to Q4_0 / Q8_0: every 2-D weight (the word embeddings, the encoder linears
    and output_layer); the norms stay float."""
    return tensor.dim() == 2


def rounded_logits(ckpt: Path, prompts: list[torch.Tensor], rounding, out: Path, rounds=encoder_linear) -> torch.Tensor:
    """A float model whose weights that `rounds` picks hold rounding(weight): another quantizer's result, computed in
    fp32."""
    tensors = {}
    for name, tensor in iter_tensors(ckpt):
        tensors[name] = rounding(tensor.float()) if rounds(name, tensor) else tensor.float()
    write_checkpoint(out, json.loads((ckpt / "config.json").read_text()), [tensors], 1, ckpt)
    return logits(ChatGLM2ForCausalLM.from_pretrained(out, device="cpu", dtype=torch.float32), prompts)


def weight_only_rows(ckpt: Path, work: Path, prompts: list[torch.Tensor], reference: torch.Tensor) -> dict:
    cpu = torch.device("cpu")

    def loaded(path: Path, dtype: torch.dtype = torch.float32, **options) -> dict:
        model = ChatGLM2ForCausalLM.from_pretrained(path, device="cpu", dtype=dtype, **options)
        return compare(reference, logits(model, prompts).float())

    rows = {"weight-only int8": loaded(ckpt, quantize="int8"),
            "weight-only int8, int8 activations": loaded(ckpt, quantize="int8", quantize_activations="int8"),
            "weight-only int8, output_layer float": loaded(ckpt, quantize="int8", quantize_output_layer=None)}
    for group in (32, 64, 128):
        default = " (the default)" if group == DEFAULT_GROUP_SIZE else ""
        rows[f"weight-only int4 g{group}{default}"] = loaded(ckpt, quantize="int4", group_size=group)
    int4 = f"weight-only int4 g{DEFAULT_GROUP_SIZE}"
    rows[f"{int4}, output_layer int8"] = loaded(ckpt, quantize="int4", quantize_output_layer="int8")
    mixed = dict(quantize="int4", quantize_attention="int8", quantize_output_layer="int8")
    rows[f"{int4}, attention and output_layer int8"] = loaded(ckpt, **mixed)
    rows[f"{int4}, attention and output_layer int8, int8 activations"] = loaded(
        ckpt, quantize_activations="int8", **mixed)
    rows[f"{int4}, output_layer float"] = loaded(ckpt, quantize="int4", quantize_output_layer=None)
    rows[f"{int4}, bf16 activations"] = loaded(ckpt, torch.bfloat16, quantize="int4")
    for bits in (8, 4):
        thudm = write_thudm_checkpoint(ckpt, work / f"thudm_int{bits}", bits)
        rows[f"THUDM int{bits} checkpoint (per row)"] = loaded(thudm)
    rows["THUDM int8 checkpoint, int8 activations"] = loaded(work / "thudm_int8", quantize_activations="int8")
    ablations = {"chatglm.cpp Q8_0 rounding (encoder linears)": (q8_0, encoder_linear),
                 "chatglm.cpp Q4_0 rounding (encoder linears)": (q4_0, encoder_linear),
                 "chatglm.cpp Q8_0 as converted (embeddings, encoder linears, output_layer)": (q8_0, matrix),
                 "chatglm.cpp Q4_0 as converted (embeddings, encoder linears, output_layer)": (q4_0, matrix),
                 "int8 without norm folding (encoder linears)":
                     (lambda w: dequantize(*quantize_int8(w, torch.float32, cpu), 8, w.dtype), encoder_linear),
                 f"int4 g{DEFAULT_GROUP_SIZE} without norm folding (encoder linears)":
                     (lambda w: dequantize(*quantize_int4(w, DEFAULT_GROUP_SIZE, torch.float32, cpu), 4, w.dtype),
                      encoder_linear),
                 f"int4 g{DEFAULT_GROUP_SIZE}, clip searched per group, without norm folding (encoder linears)":
                     (int4_clip_searched, encoder_linear)}
    for name, (rounding, rounds) in ablations.items():
        out = work / "".join(c if c.isalnum() else "_" for c in name)
        rows[name] = compare(reference, rounded_logits(ckpt, prompts, rounding, out, rounds))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default=None, help="where the checkpoint and weights go (default: a temp dir)")
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "quant_accuracy.json"))
    parser.add_argument("--weight_only", action="store_true",
                        help="only the weight-only and peer rows (W8A8's take most of an hour at full width)")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="quant_accuracy_"))
    ckpt = work / "ckpt"
    outlier_checkpoint(ckpt, args.hidden_size, args.num_layers)
    tokenizer = ChatGLM2Tokenizer.from_pretrained(ckpt)
    calibration = [tokenizer.encode(tokenizer.build_prompt(line)) for line in corpus_lines(CALIBRATION_LINES)]
    prompts = [torch.tensor(tokenizer.encode(tokenizer.build_prompt(line))) for line in corpus_lines(EVAL_LINES)]
    reference = logits(ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu", dtype=torch.float32), prompts)

    rows = {"float bf16 (for scale)": compare(reference, logits(
        ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu", dtype=torch.bfloat16), prompts).float())}
    variants = {} if args.weight_only else {"W8A8 minmax": dict(smooth=False), "W8A8 minmax + smoothing": dict(smooth=True),
                "W8A8 percentile 99.99": dict(smooth=False, percentile=99.99),
                "W8A8 percentile 99.99 + smoothing": dict(smooth=True, percentile=99.99)}
    for name, options in variants.items():
        quant_dir = work / name.replace(" ", "_").replace("+", "").replace(".", "")
        export(ckpt, calibration, quant_dir, show_progress=False, **options)
        rows[name] = compare(reference, quantized_logits(ckpt, quant_dir, prompts, torch.float32))
    if variants:
        rows["W8A8 minmax + smoothing, bf16 activations"] = compare(
            reference, quantized_logits(ckpt, work / "W8A8_minmax__smoothing", prompts, torch.bfloat16))
    sparse = {} if args.weight_only else {"sparse 50% unstructured": "unstructured", "sparse 2:4": "2:4"}
    for name, pattern in sparse.items():
        quant_dir = work / name.replace(" ", "_").replace("%", "").replace(":", "_")
        export(ckpt, calibration, quant_dir, show_progress=False, sparse_pattern=pattern)
        compress_dir = quant_dir.with_name(quant_dir.name + "_compressed")
        rows[f"W8A8 minmax + smoothing + {name}"] = compare(
            reference, quantized_logits(ckpt, quant_dir, prompts, torch.float32, compress_dir))
        info = json.loads((compress_dir / "compress0" / sparse_format.INFO).read_text())
        dense = sum(math.prod(layer["shape"]) for layer in info["layers"].values())
        compressed = sum(file.stat().st_size for file in (compress_dir / "compress0").glob("*.safetensors"))
        rows[f"W8A8 minmax + smoothing + {name}"]["compressed_over_dense"] = compressed / dense
    rows.update(weight_only_rows(ckpt, work, prompts, reference))

    tokens = sum(len(p) for p in prompts)
    print(f"{tokens} tokens in {len(prompts)} prompts; hidden {args.hidden_size}, {args.num_layers} layers (W8A8: "
          f"layer 0 float), {OUTLIER_CHANNELS} outlier channels x{OUTLIER_SCALE:g}; reference: float fp32\n")
    print("| variant | cosine (mean) | cosine (min) | top-1 agreement |\n| --- | --- | --- | --- |")
    for name, row in rows.items():
        print(f"| {name} | {row['cosine_mean']:.4f} | {row['cosine_min']:.4f} | {100 * row['top1_agreement']:.1f}% |")
    for name, row in rows.items():
        if "compressed_over_dense" in row:
            print(f"{name}: compressed files {row['compressed_over_dense']:.3f}x the dense int8 weights")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"tokens": tokens, "hidden_size": args.hidden_size,
                                             "num_layers": args.num_layers, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
