"""Compress each rank's sparse int8 weights (tp{N}/quant_weight{i}) for ENABLE_SPARSE=1 inference.

    python export_quant_weight.py --float_weight CKPT --data_path DATASET/val/Other/civil_servant.jsonl \\
        --quant_weight QUANT_WEIGHT_PATH --sparse
    export ENABLE_SPARSE=1 QUANT_WEIGHT_PATH=QUANT_WEIGHT_PATH COMPRESS_WEIGHT_PATH=COMPRESS_WEIGHT_PATH
    python process_weights.py --model_path CKPT --tp_size 1
    python generate_compress_weight.py --weight_path=QUANT_WEIGHT_PATH --save_path=COMPRESS_WEIGHT_PATH
    python main.py --mode precision_single --model_path CKPT

--weight_path is QUANT_WEIGHT_PATH (its one tp{N}/ folder, or tp{--tp_size}/ when process_weights.py cut several)
or a tp{N}/ folder itself. --save_path receives compress{i}/ for every rank i. The format is this project's own
(the 300I Duo's hardware format is not public); see chatglm2/sparse_format.py and docs/w8a8_sparse.md.
"""
import argparse

from chatglm2.cli import ArgumentParser, run_cli
from chatglm2.sparse_format import write_compressed


def main() -> None:
    parser = ArgumentParser(prog="generate_compress_weight.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weight_path", required=True, help="QUANT_WEIGHT_PATH (holding tp{N}/) or a tp{N}/ folder")
    parser.add_argument("--save_path", required=True,
                        help="folder to write, COMPRESS_WEIGHT_PATH (replaced if it holds compressed weights)")
    parser.add_argument("--tp_size", type=int, default=None,
                        help="which tp{N}/ to compress when --weight_path holds several")
    args = parser.parse_args()
    if args.tp_size is not None and args.tp_size < 1:
        parser.error(f"--tp_size must be at least 1, got {args.tp_size}")
    sizes = write_compressed(args.weight_path, args.save_path, args.tp_size)
    for rank, size in enumerate(sizes):
        print(f"compress{rank}: {size['compressed_bytes']} bytes for {size['dense_bytes']} dense int8 "
              f"({size['compressed_bytes'] / size['dense_bytes']:.3f}x)")
    print(f"wrote {len(sizes)} compressed ranks to {args.save_path}")


if __name__ == "__main__":
    run_cli(main)
