"""What the in-process benchmarks share: their common flags, and a result written as JSON, a Markdown table and a
chart under --results_dir."""
import argparse
import json
from pathlib import Path
from typing import Callable

from chatglm2.atomic import atomic_file, write_text_atomic

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def benchmark_parser(doc: str, max_wait_quiet: float = 60) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", help="default: a random checkpoint of the full width, bench_ckpt_full_L4/")
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--max_wait_quiet", type=float, default=max_wait_quiet,
                        help="seconds to wait for a quiet machine before each run")
    parser.add_argument("--results_dir", default=str(RESULTS_DIR))
    return parser


def save_chart(fig, path: Path) -> None:
    """Write a matplotlib figure as a PNG, atomically, and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def line_chart(path: Path, lines: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str,
               title: str) -> None:
    """One line per name, (x values, y values), the y axis from 0."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4.2))
    for name, (xs, ys) in lines.items():
        axis.plot(xs, ys, marker="o", markersize=3, label=name)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.set_ylim(bottom=0)
    axis.grid(True, alpha=0.3)
    axis.legend()
    save_chart(fig, path)


def write_results(results_dir: str | Path, stem: str, report: dict, table: str,
                  chart: Callable[[dict, Path], None]) -> None:
    """Print the table; write STEM.json, STEM.md and the chart STEM.png."""
    print(table)
    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    write_text_atomic(results / f"{stem}.json", json.dumps(report, indent=1) + "\n")
    write_text_atomic(results / f"{stem}.md", table)
    chart(report, results / f"{stem}.png")
