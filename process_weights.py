"""Split a ChatGLM2 checkpoint for tensor parallelism, as the reference's process_weights.py does.

    python process_weights.py --model_path CKPT --tp_size 2
    torchrun --nproc_per_node 2 --master_port 2000 main.py --mode cli_demo --model_path CKPT --tp_size 2

With ENABLE_QUANT=1 (or ENABLE_SPARSE=1) it also cuts the W8A8 weights in QUANT_WEIGHT_PATH into
QUANT_WEIGHT_PATH/tp{N}/ (tp_size 1 too); for ENABLE_SPARSE, run generate_compress_weight.py on them next.
"""
import argparse

from chatglm2 import settings
from chatglm2.cli import ArgumentParser, run_cli
from chatglm2.quant_split import write_quant_parts
from chatglm2.tensor_parallel import write_tp_parts


def main() -> None:
    parser = ArgumentParser(prog="process_weights.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="the float checkpoint folder (Hugging Face layout)")
    parser.add_argument("--tp_size", type=int, required=True, help="number of cards (torchrun --nproc_per_node)")
    parser.add_argument("--output_path", default=None,
                        help="folder for tensor_parallel_tp{N}/ (default: inside --model_path, as the reference); "
                             "then pass this folder to main.py --model_path")
    args = parser.parse_args()
    if args.tp_size < 1:
        parser.error(f"--tp_size must be at least 1, got {args.tp_size}")
    quant_path = settings.quant_path()
    if args.tp_size == 1 and not quant_path:
        print("tp_size 1: a single card loads the float checkpoint directly; nothing to split")
        return
    if args.tp_size > 1:
        root = write_tp_parts(args.model_path, args.tp_size, args.output_path)
        print(f"wrote {args.tp_size} parts under {root}")
    if quant_path:
        root = write_quant_parts(args.model_path, quant_path, args.tp_size)
        print(f"wrote {args.tp_size} quantized parts under {root}")


if __name__ == "__main__":
    run_cli(main)
