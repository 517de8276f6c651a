"""W8A8 accuracy against float on a random checkpoint with planted activation outliers, with and without smoothing.

    python -m benchmarks.quant_accuracy [--work_dir DIR] [--hidden_size 512] [--num_layers 4]

Random weights at the usual init scale (std 1/sqrt(fan_in), so every layer matters to the logits), and, as real LLMs
have, a few hidden channels 50x larger than the rest: the RMSNorm weights of those channels are scaled by 50 in every
layer, so the inputs of query_key_value and dense_h_to_4h carry the outliers, and the weight columns that read them
are divided by 50, so the float model computes what it did without them (large activations meet small weights, as
in trained LLMs; without that the outliers would saturate every attention softmax). Calibration on some lines of the
tokenizer corpus, evaluation on others (a few hundred tokens): cosine similarity of each position's logits to
float's and top-1 agreement, both in fp32 so that only quantization differs. The sparse rows (export --sparse, then
generate_compress_weight.py and ENABLE_SPARSE=1) also give the compressed size over the dense int8 size. Random
weights have no redundancy to prune, so they show the cost of pruning at its worst, not what a trained model loses.
Results go to benchmarks/results/.
"""
import argparse
import json
import math
import tempfile
from pathlib import Path

import torch

from chatglm2 import sparse_format
from chatglm2.checkpoint import write_checkpoint
from chatglm2.quant_export import export
from chatglm2.quant_split import write_quant_parts
from chatglm2.random_checkpoint import CORPUS, demo_config, random_shards, train_tokenizer
from modeling_chatglm_ascend import ChatGLM2ForCausalLM, ChatGLM2Tokenizer

ROOT = Path(__file__).resolve().parent.parent

OUTLIER_CHANNELS, OUTLIER_SCALE = 4, 50.0
CALIBRATION_LINES, EVAL_LINES = range(0, 600, 20), range(7, 2077, 97)  # disjoint


def outlier_checkpoint(path: Path, hidden_size: int, num_layers: int) -> None:
    """A ChatGLM2 checkpoint with init-scale random weights and outlier channels planted in the norm weights."""
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        train_tokenizer(Path(tokenizer_dir))
        vocab = ChatGLM2Tokenizer.from_pretrained(tokenizer_dir).vocab_size
        config = demo_config(num_layers, hidden_size, ffn_hidden_size=hidden_size * 27 // 8, num_attention_heads=8,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default=None, help="where the checkpoint and weights go (default: a temp dir)")
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "quant_accuracy.json"))
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
    variants = {"W8A8 minmax": dict(smooth=False), "W8A8 minmax + smoothing": dict(smooth=True),
                "W8A8 percentile 99.99": dict(smooth=False, percentile=99.99),
                "W8A8 percentile 99.99 + smoothing": dict(smooth=True, percentile=99.99)}
    for name, options in variants.items():
        quant_dir = work / name.replace(" ", "_").replace("+", "").replace(".", "")
        export(ckpt, calibration, quant_dir, show_progress=False, **options)
        rows[name] = compare(reference, quantized_logits(ckpt, quant_dir, prompts, torch.float32))
    rows["W8A8 minmax + smoothing, bf16 activations"] = compare(
        reference, quantized_logits(ckpt, work / "W8A8_minmax__smoothing", prompts, torch.bfloat16))
    for name, pattern in (("sparse 50% unstructured", "unstructured"), ("sparse 2:4", "2:4")):
        quant_dir = work / name.replace(" ", "_").replace("%", "").replace(":", "_")
        export(ckpt, calibration, quant_dir, show_progress=False, sparse_pattern=pattern)
        compress_dir = quant_dir.with_name(quant_dir.name + "_compressed")
        rows[f"W8A8 minmax + smoothing + {name}"] = compare(
            reference, quantized_logits(ckpt, quant_dir, prompts, torch.float32, compress_dir))
        info = json.loads((compress_dir / "compress0" / sparse_format.INFO).read_text())
        dense = sum(math.prod(layer["shape"]) for layer in info["layers"].values())
        compressed = sum(file.stat().st_size for file in (compress_dir / "compress0").glob("*.safetensors"))
        rows[f"W8A8 minmax + smoothing + {name}"]["compressed_over_dense"] = compressed / dense

    tokens = sum(len(p) for p in prompts)
    print(f"{tokens} tokens in {len(prompts)} prompts; hidden {args.hidden_size}, {args.num_layers} layers (layer 0 "
          f"float), {OUTLIER_CHANNELS} outlier channels x{OUTLIER_SCALE:g}; reference: float fp32\n")
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
