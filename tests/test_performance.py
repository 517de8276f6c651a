"""main.py --mode performance (the reference's CSV and a chart), and a smoke run of the benchmark suite's own engine."""
import csv
import json
import shutil
import subprocess

import pytest
from matplotlib import image

from helpers import assert_one_line_error, main_py, process_weights, run, torchrun

HEADER = ("Batch,InputSeqLen(Encoding),OutputSeqLen(Decoding),TimeOfFirstToken(ms),TimePerToken(ms),TimeTotal(s),"
          "Throughput(tokens/s),ThroughputE2E(tokens/s)")

pytestmark = pytest.mark.slow  # every test here starts the commands as processes


def performance(model_path, csv_path, batch: int, seq_in: str, seq_out: str,
                *extra: str) -> subprocess.CompletedProcess:
    return main_py("--mode", "performance", "--model_path", str(model_path), "--batch", str(batch),
                   "--seqlen_in_pair", seq_in, "--seqlen_out_pair", seq_out, "--performance_output_file",
                   str(csv_path), *extra)


def assert_sane(row: dict[str, str]) -> None:
    """Positive times, and the derived columns follow from the others up to the file's rounding."""
    batch, seq_out = int(row["Batch"]), int(row["OutputSeqLen(Decoding)"])
    first_ms, per_ms, total_s = (float(row[key])
                                 for key in ("TimeOfFirstToken(ms)", "TimePerToken(ms)", "TimeTotal(s)"))
    assert first_ms > 0 and per_ms > 0 and total_s >= 0
    assert total_s >= (first_ms + (seq_out - 1) * per_ms) / 1000 - 0.01
    throughput = float(row["Throughput(tokens/s)"])
    assert batch * 1000 / (per_ms + 0.005) - 0.005 <= throughput <= batch * 1000 / (per_ms - 0.005) + 0.005
    assert abs(batch * seq_out / float(row["ThroughputE2E(tokens/s)"]) - total_s) <= 0.0051


def assert_png_image(path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200 and pixels.std() > 0  # a drawing, not a blank


def test_rows_accumulate_under_one_header_with_a_chart(tiny_ckpt, tmp_path):
    csv_path = tmp_path / "perf.csv"
    first = performance(tiny_ckpt, csv_path, 2, "8,40", "3,5", "--print_response")
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("[input 8, output 3, batch row 0 of 2]") == 1
    assert first.stdout.count("[input 40, output 5, batch row 0 of 2]") == 1
    second = performance(tiny_ckpt, csv_path, 1, "8", "3")
    assert second.returncode == 0, second.stderr
    assert "[input" not in second.stdout  # responses only with --print_response

    lines = csv_path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == HEADER and lines.count(HEADER) == 1 and len(lines) == 4
    rows = list(csv.DictReader(lines))
    assert [(r["Batch"], r["InputSeqLen(Encoding)"], r["OutputSeqLen(Decoding)"]) for r in rows] == \
        [("2", "8", "3"), ("2", "40", "5"), ("1", "8", "3")]
    for row in rows:
        assert_sane(row)
    printed = [line.split() for line in second.stdout.splitlines()]  # the table: the CSV's columns and this run's row
    assert HEADER.split(",") in printed and lines[-1].split(",") in printed
    assert_png_image(csv_path.with_suffix(".png"))


def test_foreign_output_file_and_single_token_output_are_refused(tiny_ckpt, tmp_path):
    foreign = tmp_path / "notes.csv"
    foreign.write_text("name,score\nx,1\n", encoding="utf-8")
    assert_one_line_error(performance(tiny_ckpt, foreign, 1, "8", "3"), "not a performance CSV")
    assert foreign.read_text(encoding="utf-8") == "name,score\nx,1\n" and not foreign.with_suffix(".png").exists()
    assert_one_line_error(performance(tiny_ckpt, tmp_path / "perf.csv", 1, "8", "1"), "at least 2")
    assert not (tmp_path / "perf.csv").exists()


def test_tensor_parallel_rank0_writes_each_row_once(tiny_ckpt, tmp_path):
    model_path = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, model_path)
    assert process_weights(model_path, 2).returncode == 0
    csv_path = tmp_path / "perf_tp2.csv"
    result = torchrun(2, "main.py", "--mode", "performance", "--model_path", str(model_path), "--tp_size", "2",
                      "--seqlen_in_pair", "8,16", "--seqlen_out_pair", "3,3", "--performance_output_file",
                      str(csv_path))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = csv_path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == HEADER and len(lines) == 3
    for row in csv.DictReader(lines):
        assert_sane(row)
    assert result.stdout.count("TimePerToken(ms)") == 1
    assert_png_image(csv_path.with_suffix(".png"))


def test_benchmark_suite_smoke_runs_our_engine(tiny_ckpt, tmp_path):
    result = run("-m", "benchmarks.run_suite", "--model_path", str(tiny_ckpt), "--engines", "ours", "--batches", "1,2",
                 "--prompt_len", "8", "--new_tokens", "3", "--bandwidth_mib", "64", "--max_wait_quiet", "0",
                 "--results_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "decode time ÷ ours" in result.stdout
    report = json.loads((tmp_path / "latest.json").read_text(encoding="utf-8"))
    ours, floor = report["results"]
    assert ours["engine"] == "ours" and [run["batch"] for run in ours["runs"]] == [1, 2]
    assert all(run["decode_step_ms"] > 0 and run["prefill_tokens_per_s"] > 0 for run in ours["runs"])
    assert ours["run_peak_rss"] > 0 and floor["engine"] == "floor" and floor["runs"][0]["decode_step_ms"] > 0
    assert "| ours |" in (tmp_path / "latest.md").read_text(encoding="utf-8")


def test_the_gpu_check_runs_on_a_cpu(tmp_path):
    """benchmarks/gpu_check.sh's code, smoke-run on the CPU so that the GPU session's one command is not broken."""
    result = run("-m", "benchmarks.gpu_check", "--device", "cpu", "--quick", "--parts", "float,quantized,speed",
                 "--variants", "eager,int4,transformers", "--out", str(tmp_path), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text(encoding="utf-8"))
    failed = {name: part for name, part in report["results"].items() if isinstance(part, dict) and "error" in part}
    assert not failed, failed
    assert report["results"]["correctness: float (fp32, fp16) and compiled vs eager"]["pass"]
    assert {"ours fp16, eager", "ours int4 weight-only, compiled", "transformers fp16 (eager, SDPA)"} <= set(report["results"])
    assert "| ms per token |" in (tmp_path / "gpu_check.md").read_text(encoding="utf-8")
