"""Serving throughput and latency: openai_api.py answering one fixed-seed request trace in four ways, one run.

    python -m benchmarks.serving                       # full-width 4-layer random checkpoint (bench_ckpt_full_L4/)
    python -m benchmarks.serving --model_path CKPT --requests 64 --rate 1.0

The trace: --requests requests with prompts of --prompt_min..--prompt_max tokens and max_tokens of
--output_min..--output_max (uniform, fixed seed; a random-weight model never says EOS, so every answer is exactly
max_tokens long). Each trace is sent all at once and at a Poisson rate (--rate requests/s), through the real HTTP
server, streamed (SSE), to
  one-at-a-time   the server at --max_batch 1: what a server that answers one request at a time gives
  static-8        the server at --max_batch 8, fed as a static-batching server is: up to 8 waiting requests start
                  together and the next ones wait until all of them have finished
  engine-8/16     the server at --max_batch 8 / 16: continuous batching, a freed slot takes the next request at once
Per run: output tokens/s (all output tokens / wall time from the first arrival to the last token), time to first token
(from its arrival) and time per output token (after the first) per request, p50 and p99. Results go to
benchmarks/results/serving.{json,md,png}.
"""
import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path

import httpx

from benchmarks.common import start_openai_api
from benchmarks.report import benchmark_parser, save_chart, write_results
from benchmarks.run_suite import ensure_checkpoint, wait_until_quiet
from chatglm2.random_checkpoint import CORPUS
from chatglm2.tokenizer import ChatGLM2Tokenizer


SETUPS = {"one-at-a-time": (1, None), "static-8": (8, 8), "engine-8": (8, None), "engine-16": (16, None)}


def trace(args: argparse.Namespace, tokenizer: ChatGLM2Tokenizer) -> list[dict]:
    """The requests: prompt text of about the drawn length in tokens, max_tokens, and the Poisson arrival time."""
    rng = random.Random(args.seed)
    words = CORPUS.read_text(encoding="utf-8").split()
    requests, arrival = [], 0.0
    for _ in range(args.requests):
        length = rng.randint(args.prompt_min, args.prompt_max)
        text = ""
        while len(tokenizer.encode(text)) < length:
            text += rng.choice(words) + " "
        arrival += rng.expovariate(args.rate)
        requests.append({"prompt": text, "prompt_tokens": len(tokenizer.encode(text)),
                         "max_tokens": rng.randint(args.output_min, args.output_max), "arrival": arrival})
    return requests


async def send(client: httpx.AsyncClient, url: str, request: dict, arrived: float) -> dict:
    """One streamed completion: (arrival, first token, last token) times and the number of output tokens; the time
    to first token counts from the request's arrival, so time spent waiting for a static batch counts too."""
    body = {"model": "m", "prompt": request["prompt"], "max_tokens": request["max_tokens"], "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    first = last = None
    tokens = 0
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"]:  # a chunk per token that shows text, and the last one with the finish reason
                last = time.perf_counter()
                first = first or last
    return {"arrived": arrived, "first": first, "last": last, "tokens": tokens}


async def replay(url: str, requests: list[dict], poisson: bool, static_batch: int | None) -> tuple[list[dict], float]:
    """Send the trace (all at once, or each at its arrival time); with static_batch, as a static-batching server
    would take them. Returns per-request timings and the wall time."""
    limits = httpx.Limits(max_connections=len(requests) + 8)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        start = time.perf_counter()

        def arrival(request: dict) -> float:
            return start + (request["arrival"] if poisson else 0.0)

        async def arrive(request: dict) -> dict:
            await asyncio.sleep(max(0.0, arrival(request) - time.perf_counter()))
            return request

        if static_batch is None:
            async def one(request: dict) -> dict:
                return await send(client, url, await arrive(request), arrival(request))
            results = await asyncio.gather(*(one(r) for r in requests))
        else:
            arrived: asyncio.Queue = asyncio.Queue()
            for request in requests:
                asyncio.ensure_future(arrive(request)).add_done_callback(lambda task: arrived.put_nowait(task.result()))
            results = []
            while len(results) < len(requests):
                batch = [await arrived.get()]
                while len(batch) < static_batch and not arrived.empty():
                    batch.append(arrived.get_nowait())
                results += await asyncio.gather(*(send(client, url, r, arrival(r)) for r in batch))
        return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarize(results: list[dict], wall: float) -> dict:
    ttft = [(r["first"] - r["arrived"]) * 1000 for r in results]
    tpot = [(r["last"] - r["first"]) * 1000 / (r["tokens"] - 1) for r in results if r["tokens"] > 1]
    tokens = sum(r["tokens"] for r in results)
    return {"output_tokens": tokens, "wall_s": wall, "output_tokens_per_s": tokens / wall,
            "ttft_ms_p50": statistics.median(ttft), "ttft_ms_p99": percentile(ttft, 99),
            "tpot_ms_p50": statistics.median(tpot), "tpot_ms_p99": percentile(tpot, 99)}


def chart(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    names = [name for name in SETUPS if f"{name} / poisson" in report["runs"]]
    for offset, kind in ((-0.2, "all at once"), (0.2, "poisson")):
        runs = [report["runs"][f"{name} / {kind}"] for name in names]
        x = [i + offset for i in range(len(names))]
        axes[0].bar(x, [r["output_tokens_per_s"] for r in runs], width=0.4, label=kind)
        axes[1].bar(x, [r["ttft_ms_p50"] for r in runs], width=0.4, label=f"{kind} p50")
        axes[1].scatter(x, [r["ttft_ms_p99"] for r in runs], marker="_", s=200, color="black")
        axes[2].bar(x, [r["tpot_ms_p50"] for r in runs], width=0.4, label=f"{kind} p50")
        axes[2].scatter(x, [r["tpot_ms_p99"] for r in runs], marker="_", s=200, color="black")
    for axis, title in zip(axes, ("output tokens/s", "time to first token, ms (bar p50, tick p99)",
                                  "time per output token, ms (bar p50, tick p99)")):
        axis.set_xticks(range(len(names)), names, rotation=15)
        axis.set_title(title)
        axis.grid(True, axis="y", alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(f"openai_api.py, {report['requests']} requests ({report['checkpoint']})")
    save_chart(fig, path)


def table(report: dict) -> str:
    rows = ["| setup | trace | output tok/s | ÷ one-at-a-time | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) |",
            "|---|---|---|---|---|---|"]
    for name in SETUPS:
        for kind in ("all at once", "poisson"):
            r, base = report["runs"].get(f"{name} / {kind}"), report["runs"].get(f"one-at-a-time / {kind}")
            if r is None:  # a setup left out with --setups
                continue
            ratio = f"{r['output_tokens_per_s'] / base['output_tokens_per_s']:.2f}" if base else "-"
            rows.append(f"| {name} | {kind} | {r['output_tokens_per_s']:.1f} | {ratio} | "
                        f"{r['ttft_ms_p50']:.0f} / {r['ttft_ms_p99']:.0f} | {r['tpot_ms_p50']:.1f} / {r['tpot_ms_p99']:.1f} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = benchmark_parser(__doc__, max_wait_quiet=120)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt_min", type=int, default=32)
    parser.add_argument("--prompt_max", type=int, default=512)
    parser.add_argument("--output_min", type=int, default=16)
    parser.add_argument("--output_max", type=int, default=256)
    parser.add_argument("--rate", type=float, default=1.0, help="Poisson arrivals per second")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--setups", default=",".join(SETUPS),
                        help="run only these; the others' runs are kept from serving.json when its trace is this one")
    args = parser.parse_args()
    ensure_checkpoint(args)
    requests = trace(args, ChatGLM2Tokenizer.from_pretrained(args.model_path))
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    report = {"checkpoint": Path(args.model_path).resolve().name, "requests": len(requests),
              "trace": {k: getattr(args, k) for k in ("prompt_min", "prompt_max", "output_min", "output_max", "rate",
                                                      "seed")}, "runs": {}}
    previous = results_dir / "serving.json"
    if previous.is_file():
        earlier = json.loads(previous.read_text(encoding="utf-8"))
        if all(earlier.get(key) == report[key] for key in ("checkpoint", "requests", "trace")):
            report["runs"] = earlier["runs"]
    url = f"http://127.0.0.1:{args.port}/v1/completions"
    for name in args.setups.split(","):
        max_batch, static_batch = SETUPS[name]
        process = start_openai_api(args.model_path, args.port, results_dir / f"serving-{name}.log", "--max_batch",
                                   str(max_batch), "--max_waiting", str(args.requests))
        try:
            for kind, poisson in (("all at once", False), ("poisson", True)):
                busy = wait_until_quiet(args.max_wait_quiet)
                results, wall = asyncio.run(replay(url, requests, poisson, static_batch))
                report["runs"][f"{name} / {kind}"] = {**summarize(results, wall), "others_busy": busy}
                print(f"{name} / {kind}: {report['runs'][f'{name} / {kind}']}", flush=True)
        finally:
            process.terminate()
            process.wait(timeout=120)
    write_results(results_dir, "serving", report, table(report), chart)


if __name__ == "__main__":
    main()
