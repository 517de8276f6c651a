"""Our engine against its peers: one checkpoint, the same shapes, the same machine, one run; prints the ratios.

    bash benchmarks/setup_peers.sh            # once, ~8 min: builds chatglm.cpp's Python package in its own venv
    python -m benchmarks.run_suite            # ChatGLM2-6B's width with 4 layers (random weights), batch 1 and 8
    python -m benchmarks.run_suite --num_layers 28       # the whole 6B shape, where memory allows
    python -m benchmarks.run_suite --family glm4         # GLM-4-9B-chat's width (its 151,552-token vocabulary)
    python -m benchmarks.run_suite --model_path CKPT     # any ChatGLM2, ChatGLM3 or GLM-4 checkpoint, e.g. THUDM's

Engines, each timed in its own process (so each peak RSS is its own), sequentially:
  ours                 this project (default dtype: bf16 on a CPU with native bf16, fp16 on GPU)
  ours-w8a8            W8A8 (ENABLE_QUANT; layer 0 and output_layer float)
  ours-int8, ours-int4 weight-only, quantized at load (--quantize; int4 in groups of 32; output_layer likewise)
  ours-int4-g128       int4 in groups of 128 (--group_size 128: fewer bytes, less accurate)
  ours-int8-a8         int8 whose layers also round activation rows to 8 bits (--quantize_activations int8: fbgemm)
  ours-int4-out8       int4 with output_layer int8 (--quantize_output_layer int8: more accurate)
  ours-int4-mixed      int4 with the attention layers and output_layer int8 (--quantize_attention int8
                       --quantize_output_layer int8: more accurate still, more bytes)
  transformers-*       transformers' GlmForCausalLM (same math), bf16 / fp32 on CPU, fp16 on GPU
  chatglm.cpp-*        chatglm.cpp 0.4.2 (C++/ggml) converted from the same checkpoint: F16, Q8_0, Q4_0; batch 1 only
  floor                bytes of weights one decode step must read / this machine's read bandwidth, measured now
Per engine and batch size: one warm-up, then --repeats generations of a --prompt_len prefill and --new_tokens - 1
greedy decode steps; the table shows the best run (a run's decode time is its median step). Every engine gets
--threads CPU threads (chatglm.cpp through the shim that setup_peers.sh builds) and starts when the machine is quiet
(see --max_wait_quiet). Peak RSS "run" covers warm-up and timed runs (resident weights included), "load" the loading.
The table goes to stdout and, as markdown and JSON, to benchmarks/results/ (latest.* and a dated copy).
"""
import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import parse_result
from chatglm2.atomic import write_text_atomic
from chatglm2.checkpoint import read_config
from chatglm2.device import default_dtype
from chatglm2.random_checkpoint import CORPUS, FAMILIES, full_width, write_demo_checkpoint
from chatglm2.tensor_parallel import source_fingerprint
from chatglm2.tokenizer import MODEL_NAMES, load_tokenizer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

GiB = 2 ** 30
# engine name -> (worker, engine or GGML type, dtype); "auto" = the project's default dtype for the device
ENGINES = {
    "ours": ("torch", "ours", "auto"),
    "ours-w8a8": ("torch", "ours", "w8a8"),
    "ours-int8": ("torch", "ours", "int8"),
    "ours-int8-a8": ("torch", "ours", "int8+a8"),
    "ours-int4": ("torch", "ours", "int4"),
    "ours-int4-g128": ("torch", "ours", "int4 g128"),
    "ours-int4-out8": ("torch", "ours", "int4+out8"),
    "ours-int4-mixed": ("torch", "ours", "int4+attn8+out8"),
    "transformers-bf16": ("torch", "transformers", "bf16"),
    "transformers-fp32": ("torch", "transformers", "fp32"),
    "transformers-fp16": ("torch", "transformers", "fp16"),
    "chatglm.cpp-f16": ("cpp", "f16", "f16"),
    "chatglm.cpp-q8_0": ("cpp", "q8_0", "q8_0"),
    "chatglm.cpp-q4_0": ("cpp", "q4_0", "q4_0"),
}
DEFAULT_ENGINES = {
    "cpu": "ours,ours-w8a8,ours-int8,ours-int8-a8,ours-int4,transformers-bf16,transformers-fp32,chatglm.cpp-f16,chatglm.cpp-q8_0,"
           "chatglm.cpp-q4_0",
    "cuda": "ours,ours-int8,ours-int4,transformers-fp16",
}
# Bytes per weight as stored: ggml's Q8_0 keeps 32 int8 plus one fp16 scale per block, Q4_0 32 nibbles plus a scale;
# our int4 keeps 32 (the default) or 128 nibbles plus a 16-bit scale and zero per group (its mixes are shown against
# the int4 floor).
BYTES_PER_WEIGHT = {"w8a8": 1.0, "int8": 1.0, "int8+a8": 1.0, "int4": 20 / 32, "int4 g128": 68 / 128,
                    "int4+out8": 20 / 32, "int4+attn8+out8": 20 / 32,
                    "bf16": 2.0, "fp16": 2.0, "f16": 2.0, "fp32": 4.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
FLOOR_LABELS = {1.0: "int8", 20 / 32: "int4 g32", 68 / 128: "int4 g128", 2.0: "16-bit", 4.0: "fp32", 34 / 32: "Q8_0",
                18 / 32: "Q4_0"}
# weight-only formats -> torch_worker flags
WEIGHT_ONLY = {"int8": ["--quantize", "int8"], "int8+a8": ["--quantize", "int8", "--quantize_activations", "int8"],
               "int4": ["--quantize", "int4"], "int4 g128": ["--quantize", "int4", "--group_size", "128"],
               "int4+out8": ["--quantize", "int4", "--quantize_output_layer", "int8"],
               "int4+attn8+out8": ["--quantize", "int4", "--quantize_attention", "int8", "--quantize_output_layer",
                                   "int8"]}
DEFAULT_PEER_PYTHON = Path.home() / ".cache/chatglm2-bench/chatglm-cpp-venv/bin/python"


def param_counts(config: dict) -> tuple[int, int]:
    """(all parameters, those a decode step reads): a step reads every weight once, but only `batch` embedding rows.

    The KV cache read is left out: 1 KiB per token per layer, a rounding error next to the weights at these lengths.
    """
    hidden, ffn, layers = config["hidden_size"], config["ffn_hidden_size"], config["num_layers"]
    q_size = config["num_attention_heads"] * config["kv_channels"]
    qkv_rows = q_size + 2 * config["multi_query_group_num"] * config["kv_channels"]
    per_layer = qkv_rows * hidden + qkv_rows + hidden * q_size + 2 * ffn * hidden + hidden * ffn + 2 * hidden
    embedding = config["padded_vocab_size"] * hidden
    decode = layers * per_layer + hidden + config["padded_vocab_size"] * hidden
    return decode + embedding, decode


def best_seconds(fn, repeats: int) -> float:
    """The fastest of `repeats` runs: the one least disturbed by anything else on the machine."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_bandwidth(mib: int, repeats: int = 10) -> dict:
    """Read bandwidth in GB/s with all of torch's threads: the faster of two reductions (sum, max) over a buffer far
    larger than the caches, which is what a decode step does to the weights. Copy bandwidth (read + write counted,
    the write-allocate reads not) is recorded for reference."""
    src = torch.ones(mib * 2 ** 20 // 4, dtype=torch.float32)
    size = src.numel() * 4
    read = max(size / best_seconds(probe, repeats) / 1e9 for probe in (src.sum, src.amax))
    dst = torch.empty_like(src)
    copy = 2 * size / best_seconds(lambda: dst.copy_(src), repeats) / 1e9
    return {"read_GBps": read, "copy_GBps": copy, "buffer_MiB": mib}


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all cores busy over `seconds` (from /proc/stat), while this process only sleeps: others' work."""
    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def wait_until_quiet(max_wait: float, threshold: float = 0.2) -> float:
    """Wait (up to max_wait seconds) until other processes use under `threshold` of the CPU; return their share.

    On a shared machine a busy neighbour slows multi-threaded engines by far more than its share (threads wait for
    each other at every barrier), so each engine starts in the quietest moment available.
    """
    deadline = time.monotonic() + max_wait
    busy = cpu_busy()
    while busy >= threshold and time.monotonic() < deadline:
        busy = cpu_busy()
    return busy


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def total_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cpu_model() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return platform.processor() or "unknown"
    names = [line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")]
    return names[0] if names else "unknown"


def memory_needed(kind: str, what: str, dtype: str, total_params: int) -> int:
    """A generous estimate of an engine's peak, to skip what cannot fit instead of pushing the machine into OOM."""
    if kind == "cpp":
        return int(total_params * BYTES_PER_WEIGHT[what] * 1.2)
    if what == "transformers":  # the parity loader builds the model in fp32 and holds an fp32 copy of the weights
        return int(total_params * 8 * 1.1)
    if dtype == "w8a8":  # the float weights load first, then each layer is swapped for its int8 one
        return int(total_params * 3 * 1.2)
    if dtype in WEIGHT_ONLY:  # the quantized weights, the 16-bit embedding, one float tensor at a time
        return int(total_params * (BYTES_PER_WEIGHT[dtype] + 0.5) * 1.2)
    return int(total_params * BYTES_PER_WEIGHT[dtype] * 1.2)


def run_worker(command: list[str], timeout: int, **env: str) -> dict:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", **env))
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        raise RuntimeError(lines[-1])
    return parse_result(result.stdout)


def ggml_file(args: argparse.Namespace, ggml_type: str, timeout: int) -> Path:
    """The checkpoint converted to chatglm.cpp's format, cached by the weights' fingerprint."""
    name = f"{Path(args.model_path).resolve().name}-{source_fingerprint(args.model_path)}-{ggml_type}.bin"
    path = Path(args.results_dir) / "ggml" / name
    if not path.is_file():
        print(f"  converting to GGML {ggml_type.upper()} -> {path}", flush=True)
        run_worker([args.peer_python, "-m", "benchmarks.chatglm_cpp_worker", "convert", "--model_path",
                    str(args.model_path), "--ggml_type", ggml_type, "--out", str(path)], timeout)
    return path


def w8a8_weights(args: argparse.Namespace) -> Path:
    """W8A8 weights of the checkpoint (exported with the defaults, cut for one device), cached by its fingerprint;
    calibrated on lines of the repo's tokenizer corpus, which is enough for timing."""
    path = Path(args.results_dir) / "w8a8" / f"{Path(args.model_path).resolve().name}-{source_fingerprint(args.model_path)}"
    if not (path / "tp1").is_dir():
        print(f"  exporting W8A8 weights -> {path}", flush=True)
        lines = [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()][:16]
        calibration = Path(args.results_dir) / "w8a8" / "calibration.jsonl"
        write_text_atomic(calibration, "".join(json.dumps({"inputs_pretokenized": line, "choices_pretokenized": list(
            "ABCD"), "label": 0}, ensure_ascii=False) + "\n" for line in lines))
        quant_env = dict(os.environ, ENABLE_QUANT="1", QUANT_WEIGHT_PATH=str(path))
        for command in (["export_quant_weight.py", "--float_weight", str(args.model_path), "--data_path",
                         str(calibration), "--quant_weight", str(path)],
                        ["process_weights.py", "--model_path", str(args.model_path), "--tp_size", "1"]):
            result = subprocess.run([sys.executable, *command], cwd=ROOT, env=quant_env, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError((result.stderr.strip().splitlines() or [f"{command[0]} failed"])[-1])
    return path


def peer_thread_env(args: argparse.Namespace) -> tuple[dict, int | None]:
    """Environment that gives chatglm.cpp --threads threads through the shim, and the count it will use (None: the
    shim is missing, so chatglm.cpp picks). chatglm.cpp halves a hardware_concurrency above 4, so double those."""
    shim = Path(args.peer_python).parent.parent / "lib" / "libhardware_concurrency.so"
    if not shim.is_file():
        return {}, None
    reported = args.threads if args.threads <= 4 else 2 * args.threads
    return {"LD_PRELOAD": str(shim), "HARDWARE_CONCURRENCY": str(reported)}, args.threads


def run_engine(name: str, args: argparse.Namespace, device: str, config: dict) -> dict:
    kind, what, dtype = ENGINES[name]
    # Activations (and float layers) in the project's default dtype for the device; quantized weights where asked.
    activations = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[
        default_dtype(torch.device(device))] if dtype in ("auto", "w8a8", *WEIGHT_ONLY) else dtype
    dtype = activations if dtype == "auto" else dtype
    record = {"engine": name, "dtype": dtype, "threads": args.threads}
    if kind == "cpp" and device != "cpu":
        return {**record, "skipped": "chatglm.cpp is built for the CPU here"}
    if kind == "cpp" and not Path(args.peer_python).is_file():
        return {**record, "skipped": f"no {args.peer_python}: run bash benchmarks/setup_peers.sh"}
    if kind == "cpp" and what != "f16" and any(config[key] % 32 for key in ("hidden_size", "ffn_hidden_size")):
        return {**record, "skipped": "ggml quantizes blocks of 32: hidden and FFN widths must be multiples of 32"}
    needed, available = memory_needed(kind, what, dtype, param_counts(config)[0]), mem_available()
    if device == "cpu" and needed > available:
        return {**record, "skipped": f"needs ~{needed / GiB:.1f} GiB, {available / GiB:.1f} GiB available"}
    record["others_busy"] = wait_until_quiet(args.max_wait_quiet)
    print(f"{name} ({dtype}), other processes using {record['others_busy']:.0%} of the CPU ...", flush=True)
    try:
        shape = ["--prompt_len", str(args.prompt_len), "--new_tokens", str(args.new_tokens), "--repeats",
                 str(args.repeats)]
        if kind == "torch":
            env = {"ENABLE_QUANT": "1", "QUANT_WEIGHT_PATH": str(w8a8_weights(args))} if dtype == "w8a8" else {}
            quantize = WEIGHT_ONLY.get(dtype, [])
            result = run_worker([sys.executable, "-m", "benchmarks.torch_worker", "--engine", what, "--model_path",
                                 str(args.model_path), "--dtype", activations, "--device", device, "--batches",
                                 args.batches, "--threads", str(args.threads), *quantize, *shape], args.timeout, **env)
        else:
            ggml = ggml_file(args, what, args.timeout)
            env, record["threads"] = peer_thread_env(args)
            result = run_worker([args.peer_python, "-m", "benchmarks.chatglm_cpp_worker", "time", "--ggml", str(ggml),
                                 *shape], args.timeout, **env)
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        return {**record, "error": str(error)}
    return {**result, **record}


def floor_records(results: list[dict], decode_params: int, read_GBps: float, batches: list[int]) -> list[dict]:
    """One floor per storage width among the engines that ran: decode bytes / read bandwidth, the same per step at
    any batch size (the weights are read once per step however many rows share them)."""
    widths = list(dict.fromkeys(BYTES_PER_WEIGHT[r["dtype"]] for r in results if "runs" in r))
    floors = []
    for width in widths:
        step_ms = decode_params * width / (read_GBps * 1e9) * 1000
        floors.append({"engine": "floor", "dtype": FLOOR_LABELS[width], "weight_bytes": decode_params * width,
                       "runs": [{"batch": b, "decode_step_ms": step_ms, "decode_tokens_per_s": b / step_ms * 1000}
                                for b in batches]})
    return floors


def fmt(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def table_rows(records: list[dict], batches: list[int]) -> list[list[str]]:
    ours = {run["batch"]: run for r in records if r["engine"] == "ours" and "runs" in r for run in r["runs"]}
    rows = []
    for batch in batches:
        for r in records:
            run = next((run for run in r.get("runs", []) if run["batch"] == batch), None)
            if run is None:
                if batch == batches[0] and "runs" not in r:
                    rows.append([r["engine"], r["dtype"], "-", *["-"] * 8, r.get("skipped") or f"failed: {r['error']}"])
                continue
            base = ours.get(batch)
            prefill = run.get("prefill_tokens_per_s")
            threads = r.get("threads", "-")
            rows.append([
                r["engine"], r["dtype"], str(batch), "own choice" if threads is None else str(threads),
                fmt(prefill) if prefill else "-",
                fmt(run["decode_step_ms"]), fmt(run["decode_tokens_per_s"]),
                f"{base['prefill_tokens_per_s'] / prefill:.2f}" if base and prefill else "-",
                f"{run['decode_step_ms'] / base['decode_step_ms']:.2f}" if base else "-",
                f"{r['run_peak_rss'] / GiB:.2f}" if "run_peak_rss" in r else "-",
                f"{r['load_peak_rss'] / GiB:.2f}" if "load_peak_rss" in r else "-",
                f"{r['others_busy']:.0%}" if "others_busy" in r else "",
            ])
    return rows


HEADERS = ["engine", "weights", "batch", "threads", "prefill tok/s", "decode ms/step", "decode tok/s",
           "prefill time ÷ ours", "decode time ÷ ours", "peak RSS run (GiB)", "peak RSS load (GiB)",
           "others' CPU use / note"]


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(HEADERS, *rows)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [HEADERS, *rows])


def shown_path(path: str) -> str:
    """The path relative to the repository when it lies inside (so published tables do not name this machine)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def ensure_checkpoint(args: argparse.Namespace) -> None:
    if args.model_path is None:
        # ChatGLM2's keeps the name it has always had, so existing checkpoints and cached GGML files are reused
        name = "full" if args.family == "chatglm2" else args.family
        args.model_path = str(ROOT / f"bench_ckpt_{name}_L{args.num_layers}")
        if not (Path(args.model_path) / "config.json").is_file():
            print(f"writing a random-weight checkpoint of {MODEL_NAMES[args.family][0]}'s width with "
                  f"{args.num_layers} layers to {args.model_path}", flush=True)
            write_demo_checkpoint(args.model_path, num_layers=args.num_layers, num_shards=min(args.num_layers + 1, 7),
                                  family=args.family, **full_width(args.family))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", help="checkpoint to run (default: a random one of --family's full width, "
                                             "written to bench_ckpt_full_L{num_layers}/ for chatglm2, "
                                             "bench_ckpt_{family}_L{num_layers}/ otherwise, if missing)")
    parser.add_argument("--family", choices=FAMILIES, default="chatglm2",
                        help="model whose files and width the default checkpoint has (ignored with --model_path)")
    parser.add_argument("--num_layers", type=int, default=4,
                        help="layers of the default checkpoint (all: 28 for chatglm2 and chatglm3, 40 for glm4)")
    parser.add_argument("--engines", help=f"comma-separated, from {', '.join(ENGINES)} "
                                          f"(default: {DEFAULT_ENGINES['cpu']} on CPU)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=32, help="tokens generated per generation (>= 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per engine and batch size")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads for every engine (default: torch's default, one per physical core)")
    parser.add_argument("--peer_python", default=os.environ.get("CHATGLM_CPP_PYTHON", str(DEFAULT_PEER_PYTHON)),
                        help="python of the venv built by setup_peers.sh")
    parser.add_argument("--max_wait_quiet", type=float, default=120,
                        help="seconds to wait before each engine for other processes to leave the CPU idle")
    parser.add_argument("--bandwidth_mib", type=int, default=1024, help="buffer for the bandwidth measurement")
    parser.add_argument("--results_dir", default=str(HERE / "results"))
    parser.add_argument("--timeout", type=int, default=3600, help="seconds allowed per engine")
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new_tokens must be at least 2: the decode time needs one decode step")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    engines = (args.engines or DEFAULT_ENGINES[device]).split(",")
    unknown = [name for name in engines if name not in ENGINES]
    if unknown:
        parser.error(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    batches = [int(b) for b in args.batches.split(",")]
    ensure_checkpoint(args)
    config = read_config(args.model_path)
    family = load_tokenizer(args.model_path).chat_family  # from the files: --model_path may name any family's
    total_params, decode_params = param_counts(config)

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    torch.set_num_threads(args.threads)
    bandwidth = {"before": measure_bandwidth(args.bandwidth_mib)}
    print(f"read bandwidth {bandwidth['before']['read_GBps']:.1f} GB/s ({args.threads} threads); load average "
          f"{load_before[0]:.2f}", flush=True)
    results = [run_engine(name, args, device, config) for name in engines]
    bandwidth["after"] = measure_bandwidth(args.bandwidth_mib)
    # The floor uses the best read rate seen: a lower bound on the time, whatever else the machine was doing.
    bandwidth["read_GBps"] = max(bandwidth["before"]["read_GBps"], bandwidth["after"]["read_GBps"])
    records = results + floor_records(results, decode_params, bandwidth["read_GBps"], batches)
    load_after = os.getloadavg()

    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_GiB": round(total_memory() / GiB, 1),
               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "python": platform.python_version(), "load_average_before": load_before,
               "load_average_after": load_after}
    versions = {"torch": torch.__version__, "transformers": importlib.metadata.version("transformers"),
                **{"chatglm-cpp": r["version"] for r in results if "version" in r}}
    shape = {key: config[key] for key in ("num_layers", "hidden_size", "ffn_hidden_size", "padded_vocab_size")}
    report = {"date": started.isoformat(timespec="seconds"), "command": " ".join(sys.argv), "machine": machine,
              "checkpoint": str(args.model_path), "family": family, "shape": shape, "parameters": total_params,
              "decode_parameters": decode_params, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "repeats": args.repeats, "threads": args.threads, "versions": versions, "bandwidth": bandwidth,
              "results": records}
    summary = [
        f"{started:%Y-%m-%d %H:%M} UTC, {machine['cpu']}, {machine['cores']} cores, {machine['memory_GiB']} GiB, "
        f"{machine['device']}; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
        + ", ".join(f"{name} {version}" for name, version in versions.items()),
        f"checkpoint {shown_path(args.model_path)} ({MODEL_NAMES[family][0]}'s files): {shape['num_layers']} layers "
        f"of hidden {shape['hidden_size']}, FFN {shape['ffn_hidden_size']}, vocab {shape['padded_vocab_size']} "
        f"({total_params / 1e6:,.0f} M parameters)",
        f"prompt {args.prompt_len} tokens, {args.new_tokens - 1} decode steps, best of {args.repeats} runs, "
        f"{args.threads} threads; read bandwidth {bandwidth['read_GBps']:.1f} GB/s (best of before and after)",
    ]
    rows = table_rows(records, batches)
    print("\n" + "\n".join(summary) + "\n\n" + text_table(rows), flush=True)
    markdown = ("  \n".join(summary) + "\n\n" + markdown_table(rows) + "\n\n"
                "Time ratios are the row's time ÷ our engine's at the same batch (above 1: slower than ours). "
                "Others' CPU use: the share of the cores other processes used just before the engine started "
                "(the suite waits up to --max_wait_quiet seconds for it to fall below 20%). "
                "Floor: bytes of weights one decode step reads ÷ the read bandwidth measured in the same run. "
                "chatglm.cpp generates one sequence at a time, so it has batch-1 rows only.\n")
    results_dir = Path(args.results_dir)
    stamp = f"{started:%Y%m%d-%H%M%S}"
    for stem in (f"suite-{stamp}", "latest"):
        write_text_atomic(results_dir / f"{stem}.md", markdown)
        write_text_atomic(results_dir / f"{stem}.json", json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {results_dir / 'latest.md'}, {results_dir / 'latest.json'} (and suite-{stamp}.*)", flush=True)


if __name__ == "__main__":
    main()
