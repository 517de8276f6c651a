"""What every benchmark worker shares: the prompt, peak-memory readings, and the one JSON line it prints.

Standard library only: the chatglm.cpp worker imports this inside the peer's venv, in a process that must not pay
for importing torch (its memory would count against the peer).
"""
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "BENCH_RESULT "  # marks the worker's JSON line among library chatter on stdout
FIRST_ID = 100  # clear of <unk>, <s>, </s> (0-2); which ids follow does not matter for timing


def prompt_ids(length: int, vocab_size: int) -> list[int]:
    """The same deterministic token ids for every engine, all below `vocab_size` (content is irrelevant to timing)."""
    span = vocab_size - FIRST_ID
    return [FIRST_ID + (7919 * i) % span for i in range(length)]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size since start or since the last reset_peak_rss()."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Restart the peak-RSS watermark (Linux clear_refs 5), so a run's peak excludes loading; False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def timing_summary(batch: int, prompt_len: int, prefill_s: list[float], step_s: list[list[float]]) -> dict:
    """One batch size's numbers from repeated generations (prefill seconds and decode-step seconds of each).

    The best run counts: on a shared machine other processes stall some runs, never speed one up. A run's decode
    time is its median step, so a few stalled steps do not spoil it. The medians over all runs are kept too.
    """
    prefill = min(prefill_s)
    step = min(statistics.median(steps) for steps in step_s)
    return {"batch": batch, "prompt_len": prompt_len, "prefill_ms": prefill * 1000,
            "prefill_tokens_per_s": batch * prompt_len / prefill, "decode_step_ms": step * 1000,
            "decode_tokens_per_s": batch / step, "repeats": len(prefill_s),
            "prefill_median_ms": statistics.median(prefill_s) * 1000,
            "decode_step_median_ms": statistics.median(s for steps in step_s for s in steps) * 1000}


def emit(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def parse_result(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        raise RuntimeError("the worker printed no result line")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def start_openai_api(model_path: str, port: int, log: Path, *flags: str, **env: str) -> subprocess.Popen:
    """openai_api.py in a process of its own (output to `log`, `env` added to the environment), returned once GET
    /health answers."""
    process = subprocess.Popen([sys.executable, "openai_api.py", "--model_path", model_path, "--server_port", str(port),
                                *flags], cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               env={**os.environ, **env})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return process
        except OSError:
            time.sleep(1)
    process.kill()
    raise RuntimeError("the server did not start in 10 minutes")
