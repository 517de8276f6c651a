"""`main.py --mode performance`: the reference's latency benchmark, its CSV, and a chart of the curve.

For each (seqlen_in, seqlen_out) pair: `--batch` copies of a prompt filled to exactly seqlen_in tokens, greedy
generation of exactly seqlen_out tokens (EOS ignored), after one warm-up. First-token time is the prefill, per-token
time the mean decode step, total the whole generation; under tensor parallel each is the slowest rank's.
"""
import csv
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from chatglm2 import collectives
from chatglm2.atomic import atomic_file, write_text_atomic
from chatglm2.chat_modes import printable
from chatglm2.device import synchronize
from chatglm2.errors import InputError
from chatglm2.generation import chat_input
from chatglm2.model import ChatGLM2ForCausalLM
from chatglm2.tokenizer import ChatGLM2Tokenizer

HEADER = ("Batch,InputSeqLen(Encoding),OutputSeqLen(Decoding),TimeOfFirstToken(ms),TimePerToken(ms),TimeTotal(s),"
          "Throughput(tokens/s),ThroughputE2E(tokens/s)")
QUESTION = "如何学习python？"
FILLER = "中国的首都在哪里？请做一首诗歌。五条直线相交有几个交点？"
WARMUP_NEW_TOKENS = 2  # a prefill and a decode step, so first-call costs (allocation, kernel choice) are not timed
CHART_SOURCE = "chatglm2 main.py --mode performance"  # a tEXt entry of the PNG: recognises our own chart


@dataclass
class Timing:
    batch: int
    seq_in: int
    seq_out: int
    first_token_ms: float
    per_token_ms: float
    total_s: float

    @property
    def throughput(self) -> float:
        """Tokens per second over the decode steps: `batch` tokens per step (the reference's definition)."""
        return self.batch / (self.per_token_ms / 1000)

    @property
    def throughput_e2e(self) -> float:
        return self.batch * self.seq_out / self.total_s

    def csv_row(self) -> str:
        return (f"{self.batch},{self.seq_in},{self.seq_out},{self.first_token_ms:.2f},{self.per_token_ms:.2f},"
                f"{self.total_s:.2f},{self.throughput:.2f},{self.throughput_e2e:.2f}")


def filled_prompt(tokenizer: ChatGLM2Tokenizer, seq_in: int, batch: int) -> torch.Tensor:
    """[batch, seq_in] token ids: `[gMASK] sop`, filler text, then the model's chat-formatted question.

    Every position is a real token, so no padding mask changes the attention work being timed.
    """
    prompt = chat_input(tokenizer, QUESTION, [])
    if seq_in <= len(prompt):
        ids = prompt[-seq_in:]
    else:
        filler = tokenizer.encode(FILLER, add_special_tokens=False)
        needed = seq_in - len(prompt)
        ids = prompt[:2] + (filler * math.ceil(needed / len(filler)))[:needed] + prompt[2:]
    return torch.tensor([ids] * batch, dtype=torch.long)


@dataclass
class GenerationTimes:
    prefill_s: float  # call to first token: the prefill forward and its sampling
    step_s: list[float]  # each later token: one decode forward and its sampling
    total_s: float
    tokens: torch.Tensor  # [batch, max_new_tokens]


def time_generation(model: ChatGLM2ForCausalLM, input_ids: torch.Tensor, max_new_tokens: int) -> GenerationTimes:
    """Time one greedy generation that never stops early.

    generate_stream yields right after each forward, so the gap before the first yield is the prefill and each later
    gap one decode step; synchronizing first makes queued device work count where it ran. Prefix caching is off:
    the runs repeat their prompts, and each must prefill all of its tokens.
    """
    device = model.device
    synchronize(device)
    start = time.perf_counter()
    stamps, tokens = [], []
    for token in model.generate_stream(input_ids, max_new_tokens=max_new_tokens, ignore_eos=True,
                                       prefix_caching=False):
        synchronize(device)
        stamps.append(time.perf_counter())
        tokens.append(token)
    steps = [later - earlier for earlier, later in zip(stamps, stamps[1:])]
    return GenerationTimes(stamps[0] - start, steps, stamps[-1] - start, torch.stack(tokens, dim=1))


def is_own_chart(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.text.get("Source") == CHART_SOURCE
    except (UnidentifiedImageError, OSError):
        return False


def output_file_problem(path: Path) -> str | None:
    """Why rows must not be appended to `path` or the chart beside it redrawn, or None: the same file for both, a
    folder, or files that this benchmark did not write (they would be replaced)."""
    chart = path.with_suffix(".png")
    if chart == path:
        return f"--performance_output_file {path} ends in .png, the name of the chart drawn beside it; give a .csv name"
    for file in (path, chart):
        if file.exists() and not file.is_file():
            return f"{file} exists and is not a file; pass another --performance_output_file"
    if path.is_file() and path.stat().st_size > 0:
        try:
            with open(path, encoding="utf-8") as f:
                first_line = f.readline().rstrip("\n")
        except UnicodeDecodeError:
            first_line = None
        if first_line != HEADER:
            shown = "not UTF-8 text" if first_line is None else repr(first_line[:60])
            return (f"{path} exists but is not a performance CSV (its first line is {shown}); "
                    f"pass another --performance_output_file")
    if chart.exists() and not is_own_chart(chart):
        return (f"{chart} exists and is not a chart drawn by this benchmark, and this run's chart would replace it; "
                f"move it away or pass another --performance_output_file")
    return None


def check_output_file(path: Path) -> None:
    """InputError when output_file_problem finds one. Rank 0 owns the file; every rank learns its verdict so that all
    stop together (main.py asks before the model loads, run_performance again before any timing)."""
    problem = collectives.broadcast_object(output_file_problem(path) if collectives.is_rank0() else None)
    if problem:
        raise InputError(problem)


def append_row(path: Path, timing: Timing) -> None:
    """Append one row (the header first when the file is new or empty); atomic, so a crash never truncates it."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if not old.strip():
        old = HEADER + "\n"
    elif not old.endswith("\n"):
        old += "\n"
    write_text_atomic(path, old + timing.csv_row() + "\n")


def read_rows(path: Path) -> list[dict[str, float]]:
    """The CSV's numeric rows; others (a header repeated by the reference's script, a hand edit) are skipped."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                rows.append({key: float(value) for key, value in row.items()})
            except (TypeError, ValueError):
                continue
    return rows


def write_chart(csv_path: Path) -> Path:
    """PNG beside the CSV: per-token and first-token time against input length, one line per batch size.

    Built from every row in the CSV, so runs with different --batch accumulate; when a (batch, input length) was
    measured more than once, the latest row is drawn.
    """
    import matplotlib
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    latest: dict[int, dict[int, dict[str, float]]] = {}
    for row in read_rows(csv_path):
        latest.setdefault(int(row["Batch"]), {})[int(row["InputSeqLen(Encoding)"])] = row
    lengths_drawn = sorted({n for by_length in latest.values() for n in by_length})
    fig, (per_token, first_token) = plt.subplots(1, 2, figsize=(11, 4.2))
    for batch, by_length in sorted(latest.items()):
        lengths = sorted(by_length)
        per_token.plot(lengths, [by_length[n]["TimePerToken(ms)"] for n in lengths], marker="o", label=f"batch {batch}")
        first_token.plot(lengths, [by_length[n]["TimeOfFirstToken(ms)"] for n in lengths], marker="o",
                         label=f"batch {batch}")
    for axes, title in ((per_token, "time per token (decode)"), (first_token, "time of first token (prefill)")):
        axes.set(title=title, xlabel="input length (tokens)", ylabel="ms")
        axes.set_xscale("log", base=2)
        axes.set_xticks(lengths_drawn, [str(n) for n in lengths_drawn])  # the measured lengths, not powers of 2
        axes.minorticks_off()
        axes.grid(True, alpha=0.3)
        axes.legend()
    fig.suptitle(csv_path.name)
    fig.tight_layout()
    png_path = csv_path.with_suffix(".png")
    with atomic_file(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Source": CHART_SOURCE})
    plt.close(fig)
    return png_path


def print_table_row(cells: list[str]) -> None:
    print("  ".join(cell.rjust(width) for cell, width in zip(cells, map(len, HEADER.split(",")))), flush=True)


def run_performance(model: ChatGLM2ForCausalLM, tokenizer: ChatGLM2Tokenizer, batch: int, pairs: list[tuple[int, int]],
                    output_file: str | Path, print_response: bool = False) -> None:
    """Time every (seqlen_in, seqlen_out) pair, append to output_file, redraw its chart."""
    output_file = Path(output_file)
    rank0 = collectives.is_rank0()
    check_output_file(output_file)
    warmup_in = min(seq_in for seq_in, _ in pairs)
    time_generation(model, filled_prompt(tokenizer, warmup_in, batch), WARMUP_NEW_TOKENS)
    if rank0:
        print(model.kv_cache_summary(), flush=True)
        print_table_row(HEADER.split(","))
    for seq_in, seq_out in pairs:
        times = time_generation(model, filled_prompt(tokenizer, seq_in, batch), seq_out)
        timing = Timing(batch, seq_in, seq_out, collectives.all_ranks_max(times.prefill_s) * 1000,
                        collectives.all_ranks_max(statistics.fmean(times.step_s)) * 1000,
                        collectives.all_ranks_max(times.total_s))
        if rank0:
            append_row(output_file, timing)
            print_table_row(timing.csv_row().split(","))
            if print_response:
                print(f"[input {seq_in}, output {seq_out}, batch row 0 of {batch}] "
                      f"{printable(tokenizer.decode(times.tokens[0]).strip())}", flush=True)
    if rank0:
        print(f"rows appended to {output_file}; chart {write_chart(output_file)}", flush=True)
