"""A long soak of varied requests against openai_api.py: does the server's resident memory stay bounded?

    python -m benchmarks.soak                                    # small random checkpoint (bench_ckpt_small/)
    python -m benchmarks.soak --model_path bench_ckpt_full_L4 --requests 5280

The server (--max_batch 8, MAX_SEQ_LEN 2048) answers --requests chat completions sent by --clients threads, drawn
with a fixed seed: prompts of 1 to --prompt_max characters of the tokenizer's corpus, max_tokens 1 to 64, a quarter
streamed (a third of those closed after two chunks, as a client that leaves), a third sampled (temperature, top_p,
seed), and one in sixteen asking for more than MAX_SEQ_LEN, which must be refused with 400. After each block of
--block requests the server process's resident memory (VmRSS) is read; a greedy probe asked before the soak must get
the same answer after it. Results go to benchmarks/results/soak.{json,md,png}; the chart draws RSS against requests.
"""
import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from benchmarks.common import ROOT, start_openai_api
from benchmarks.report import benchmark_parser, line_chart, write_results
from chatglm2.random_checkpoint import CORPUS, write_demo_checkpoint
PROBE = {"model": "m", "messages": [{"role": "user", "content": "你好，请介绍一下你自己。"}], "max_tokens": 16,
         "temperature": 0}


def requests_of(seed: int, count: int, prompt_max: int) -> list[dict]:
    """The soak's requests: a body each, and what the client does with it ("plain", "stream", "leave", "refused")."""
    rng = random.Random(seed)
    corpus = " ".join(CORPUS.read_text(encoding="utf-8").split())
    out = []
    for i in range(count):
        start = rng.randrange(len(corpus) - prompt_max)
        text = corpus[start:start + rng.randint(1, prompt_max)].strip() or "你好"
        body = {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": rng.randint(1, 64),
                "temperature": 0}
        if rng.random() < 1 / 3:
            body.update(temperature=0.8, top_p=0.8, seed=i)
        kind = "plain"
        if rng.random() < 1 / 16:
            body["max_tokens"], kind = 5000, "refused"
        elif rng.random() < 1 / 4:
            body["stream"] = True
            kind = "leave" if rng.random() < 1 / 3 else "stream"
        out.append({"body": body, "kind": kind})
    return out


def send(client: httpx.Client, url: str, request: dict) -> str:
    """One request as its kind says; the outcome: "ok", "refused" (a 400 that was expected), or what went wrong."""
    body, kind = request["body"], request["kind"]
    if not body.get("stream"):
        response = client.post(url, json=body)
        if kind == "refused":
            return "refused" if response.status_code == 400 else f"expected 400, got {response.status_code}"
        if response.status_code != 200:
            return f"status {response.status_code}: {response.text[:80]}"
        return "ok" if response.json()["choices"] else "no choices"
    with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            return f"status {response.status_code}"
        chunks = 0
        for line in response.iter_lines():
            if line.startswith("data: "):
                chunks += 1
                if kind == "leave" and chunks == 2:
                    return "ok"  # closing the response disconnects, and the server cancels the request
    return "ok"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"process {pid} has no VmRSS")


def soak(model_path: str, requests: list[dict], block: int, clients: int, port: int, log: Path,
         extra: list[str] = (), progress=print) -> dict:
    """Run the soak; the report: RSS after loading and after each block, outcomes, the probe before and after."""
    process = start_openai_api(model_path, port, log, "--max_batch", "8", "--max_waiting", "1000", *extra,
                               MAX_SEQ_LEN="2048")
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        with httpx.Client(timeout=600) as client:
            probe_before = client.post(url, json=PROBE).json()["choices"][0]["message"]["content"]
            report = {"rss_loaded_mb": rss_mb(process.pid), "rss_mb": [], "requests_done": [], "outcomes": {}}
            with ThreadPoolExecutor(clients) as pool:
                for start in range(0, len(requests), block):
                    for outcome in pool.map(lambda r: send(client, url, r), requests[start:start + block]):
                        report["outcomes"][outcome] = report["outcomes"].get(outcome, 0) + 1
                    report["rss_mb"].append(rss_mb(process.pid))
                    report["requests_done"].append(min(start + block, len(requests)))
                    progress(f"{report['requests_done'][-1]} requests: server RSS {report['rss_mb'][-1]:.0f} MB")
            report["probe_unchanged"] = client.post(url, json=PROBE).json()["choices"][0]["message"]["content"] == \
                probe_before
    finally:
        process.terminate()
        process.wait(timeout=120)
    return report


def chart(report: dict, path: Path) -> None:
    line_chart(path, {name: ([0, *run["requests_done"]], [run["rss_loaded_mb"], *run["rss_mb"]])
                      for name, run in report["runs"].items()},
               "requests answered", "server RSS (MB)", f"openai_api.py under a soak ({report['checkpoint']})")


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--requests", type=int, default=5280)
    parser.add_argument("--block", type=int, default=240)
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--prompt_max", type=int, default=400, help="characters of the corpus (about a token each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--name", default="this commit", help="the run's name in the chart (runs accumulate)")
    parser.add_argument("--server_args", default="", help="extra openai_api.py flags, space-separated")
    args = parser.parse_args()
    if args.model_path is None:
        args.model_path = str(ROOT / "bench_ckpt_small")
        if not (Path(args.model_path) / "config.json").is_file():
            write_demo_checkpoint(args.model_path)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    report = {"checkpoint": Path(args.model_path).name, "requests": args.requests, "block": args.block,
              "clients": args.clients, "runs": {}}
    previous = results / "soak.json"
    if previous.is_file():
        earlier = json.loads(previous.read_text(encoding="utf-8"))
        if all(earlier.get(key) == report[key] for key in ("checkpoint", "requests", "block", "clients")):
            report["runs"] = earlier["runs"]
    run = soak(args.model_path, requests_of(args.seed, args.requests, args.prompt_max), args.block, args.clients,
               args.port, results / "soak-server.log", args.server_args.split())
    report["runs"][args.name] = run
    lines = ["| run | RSS loaded (MB) | after the first block | after the last | last / first | probe unchanged | "
             "outcomes |", "|---|---|---|---|---|---|---|"]
    for name, r in report["runs"].items():
        lines.append(f"| {name} | {r['rss_loaded_mb']:.0f} | {r['rss_mb'][0]:.0f} | {r['rss_mb'][-1]:.0f} | "
                     f"{r['rss_mb'][-1] / r['rss_mb'][0]:.2f} | {r['probe_unchanged']} | {r['outcomes']} |")
    write_results(results, "soak", report, "\n".join(lines) + "\n", chart)


if __name__ == "__main__":
    main()
