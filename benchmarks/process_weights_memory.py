"""Peak memory of process_weights.py against the largest shard and the whole checkpoint.

    python -m benchmarks.process_weights_memory                    # full width, 4 layers, 5 shards; tp 2
    python -m benchmarks.process_weights_memory --model_path CKPT --tp_size 4

The claim it checks: splitting streams one source shard at a time, so the peak resident memory stays near one
shard (plus the interpreter and torch), not the whole model. The parts are written to a temporary folder and removed.
"""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from chatglm2.checkpoint import weight_files
from chatglm2.random_checkpoint import FULL_WIDTH, write_demo_checkpoint

ROOT = Path(__file__).resolve().parent.parent

MiB = 2 ** 20
DEFAULT_CHECKPOINT = ROOT / "bench_ckpt_full_L4"  # the suite's default checkpoint: 4 layers in 5 shards


def peak_rss_of(command: list[str]) -> int:
    """Peak resident set size of a child process, in bytes (from its rusage; Linux reports KiB)."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed: {process.stderr.read().decode().strip().splitlines()[-1:]}")
    return usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", type=Path, default=DEFAULT_CHECKPOINT,
                        help="multi-shard checkpoint (default: written if missing, 2.6 GB)")
    parser.add_argument("--tp_size", type=int, default=2)
    args = parser.parse_args()
    if not (args.model_path / "config.json").is_file():
        print(f"writing a random full-width checkpoint, 4 layers in 5 shards, to {args.model_path}", flush=True)
        write_demo_checkpoint(args.model_path, num_layers=4, num_shards=5, **FULL_WIDTH)
    shards = sorted(set(weight_files(args.model_path).values()))
    sizes = [file.stat().st_size for file in shards]
    # What any process_weights.py run costs before touching a weight: the interpreter, torch and the project.
    baseline = peak_rss_of([sys.executable, "-c", "import torch, chatglm2.tensor_parallel, modeling_chatglm_ascend"])
    with tempfile.TemporaryDirectory() as out:
        peak = peak_rss_of([sys.executable, "process_weights.py", "--model_path", str(args.model_path), "--tp_size",
                            str(args.tp_size), "--output_path", out])
    print(f"checkpoint      {args.model_path}: {len(shards)} shards, {sum(sizes) / MiB:,.0f} MiB in all")
    print(f"largest shard   {max(sizes) / MiB:,.0f} MiB")
    print(f"baseline        {baseline / MiB:,.0f} MiB (python + torch + the project's modules)")
    print(f"peak RSS        {peak / MiB:,.0f} MiB for process_weights.py --tp_size {args.tp_size}")
    print(f"peak - baseline {(peak - baseline) / MiB:,.0f} MiB = {(peak - baseline) / max(sizes):.2f} x the largest "
          f"shard = {(peak - baseline) / sum(sizes):.2f} x the whole checkpoint")


if __name__ == "__main__":
    main()
