"""Calibrate W8A8 weights for ChatGLM2 and write modelslim's eight .npy dicts (plus .safetensors copies).

    python export_quant_weight.py --float_weight CKPT --data_path DATASET/val/Social_Science/teacher_qualification.jsonl \\
        --quant_weight QUANT_WEIGHT_PATH
    export ENABLE_QUANT=1 QUANT_WEIGHT_PATH=QUANT_WEIGHT_PATH
    python process_weights.py --model_path CKPT --tp_size 1      # also for a single card
    python main.py --mode precision_single --model_path CKPT

The prompts are the chat prompts of the file's questions (C-Eval jsonl, or the official CSV). The layers of
config.json's float_layers_id and output_layer stay float. --sparse prunes each weight (Wanda: lowest |W_ij| * ||X_j||
per output row, after smoothing) before quantizing it; then compress with generate_compress_weight.py.
"""
import argparse
from pathlib import Path

from chatglm2 import quant_export
from chatglm2.ceval import read_csv, read_jsonl
from chatglm2.checkpoint import read_config
from chatglm2.cli import ArgumentParser, run_cli
from chatglm2.device import DEVICE_KINDS, select_device
from chatglm2.errors import InputError
from chatglm2.generation import chat_input
from chatglm2.tokenizer import ChatGLM2Tokenizer, load_tokenizer


def calibration_prompts(data_path: str, tokenizer: ChatGLM2Tokenizer, num_samples: int | None) -> list[list[int]]:
    file = Path(data_path)
    if not file.is_file():
        raise InputError(f"--data_path {data_path} does not exist; give a C-Eval .jsonl (or _val.csv) file")
    items, _ = read_csv(file, False) if file.suffix == ".csv" else read_jsonl(file, False)
    texts = [text for text, _ in items][:num_samples]
    return [chat_input(tokenizer, text, []) for text in texts]


def main() -> None:
    parser = ArgumentParser(prog="export_quant_weight.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--float_weight", required=True, help="the float checkpoint folder (Hugging Face layout)")
    parser.add_argument("--data_path", required=True, help="calibration questions: a C-Eval .jsonl or _val.csv file")
    parser.add_argument("--quant_weight", required=True, help="folder to write (replaced if it holds quantized weights)")
    parser.add_argument("--sparse", action="store_true",
                        help="sparse quantization: prune (Wanda) before quantizing, for generate_compress_weight.py")
    parser.add_argument("--sparse_pattern", choices=("unstructured", "2:4"), default=None,
                        help="with --sparse: per-row unstructured (default) or 2 of every 4 consecutive inputs")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="with --sparse, unstructured: the fraction of each row's weights to zero (default 0.5)")
    parser.add_argument("--smooth", action=argparse.BooleanOptionalAction, default=True,
                        help="SmoothQuant outlier smoothing of query_key_value and dense_h_to_4h (default: on)")
    parser.add_argument("--smooth_alpha", type=float, default=0.5,
                        help="migration strength a in s_j = max|X_j|^a / max|W_j|^(1-a) (default 0.5)")
    parser.add_argument("--act_method", choices=("minmax", "percentile"), default="minmax",
                        help="activation range estimator (default minmax)")
    parser.add_argument("--percentile", type=float, default=99.99,
                        help="with --act_method percentile: the range keeps this percentage of values (default 99.99)")
    parser.add_argument("--num_samples", type=int, default=None, help="use only the first N questions (default: all)")
    parser.add_argument("--backend", default="auto", choices=DEVICE_KINDS,
                        help="device kind for calibration; auto picks NPU, else CUDA, else CPU")
    args = parser.parse_args()
    if not args.sparse and (args.sparse_pattern or args.sparsity is not None):
        raise InputError("--sparse_pattern and --sparsity need --sparse")
    if args.sparse_pattern == "2:4" and args.sparsity is not None:
        raise InputError("--sparsity does not apply to --sparse_pattern 2:4, which zeros half of the weights")
    if args.sparsity is not None and not 0 < args.sparsity < 1:
        raise InputError(f"--sparsity must be between 0 and 1, got {args.sparsity}")
    if not 0 < args.smooth_alpha < 1:
        raise InputError(f"--smooth_alpha must be between 0 and 1, got {args.smooth_alpha}")
    if not 50 < args.percentile <= 100:
        raise InputError(f"--percentile must be above 50 and at most 100, got {args.percentile}")
    if args.num_samples is not None and args.num_samples < 1:
        raise InputError(f"--num_samples must be at least 1, got {args.num_samples}")
    read_config(args.float_weight)  # a missing checkpoint is named as such, not as a missing tokenizer
    tokenizer = load_tokenizer(args.float_weight)
    prompts = calibration_prompts(args.data_path, tokenizer, args.num_samples)
    quant_export.export(args.float_weight, prompts, args.quant_weight, smooth=args.smooth, alpha=args.smooth_alpha,
                        percentile=args.percentile if args.act_method == "percentile" else None,
                        device=select_device(args.backend),
                        sparse_pattern=(args.sparse_pattern or "unstructured") if args.sparse else None,
                        sparsity=0.5 if args.sparsity is None else args.sparsity)
    print(f"wrote the {'sparse ' if args.sparse else ''}W8A8 weights of {args.float_weight} ({len(prompts)} calibration "
          f"prompts) to {args.quant_weight}")


if __name__ == "__main__":
    run_cli(main)
