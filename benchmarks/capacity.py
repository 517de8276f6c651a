"""How many requests run at once in a fixed KV-cache budget: static slots against the paged pool, one run.

    python -m benchmarks.capacity                         # full-width 4-layer random checkpoint (bench_ckpt_full_L4/)
    python -m benchmarks.capacity --budget_slots 4 --requests 32

The budget is --budget_slots x MAX_SEQ_LEN tokens of KV cache: what --budget_slots static slots reserve, one whole
MAX_SEQ_LEN row per request, as every version before the pool did (and so at most --budget_slots requests at once).
The trace: --requests requests, all queued at once, prompts of --prompt_min..--prompt_max tokens and
--output_min..--output_max new tokens (uniform, fixed seed; random weights never say EOS, so every answer has its full
length). "static" runs it at max_batch = --budget_slots; "paged" at max_batch = --paged_max_batch in the same pool,
admitting by free blocks and preempting when they run out. Per setting: the most and the mean requests decoding at
once, preemptions, output tokens/s over the whole trace. Results go to benchmarks/results/capacity.{json,md,png}.
"""
import random
import time
from pathlib import Path

import torch

from benchmarks.common import prompt_ids
from benchmarks.report import benchmark_parser, save_chart, write_results
from benchmarks.run_suite import ensure_checkpoint, wait_until_quiet
from chatglm2.engine import Engine, SamplingParams
from modeling_chatglm_ascend import ChatGLM2ForCausalLM


def run(model, trace: list[tuple[int, int]], max_batch: int, kv_cache_tokens: int) -> dict:
    engine = Engine(model, max_batch, kv_cache_tokens=kv_cache_tokens, prefix_caching=False)
    vocab = model.config.padded_vocab_size
    start = time.perf_counter()
    requests = [engine.submit(prompt_ids(prompt_len + i, vocab)[i:], SamplingParams(max_new_tokens=new, ignore_eos=True))
                for i, (prompt_len, new) in enumerate(trace)]
    running, times = [], []
    while engine.has_work():
        if engine.step() == "decode":
            running.append(len(engine.running))
            times.append(time.perf_counter() - start)
    elapsed = time.perf_counter() - start
    assert all(r.finish_reason == "length" for r in requests)
    return {"max_batch": max_batch, "most_running": max(running), "mean_running": sum(running) / len(running),
            "preemptions": engine.preemptions, "output_tokens_per_s": sum(len(r.tokens) for r in requests) / elapsed,
            "seconds": elapsed, "running": running, "times_s": times}


def chart(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4.2))
    for name, result in report["runs"].items():
        axis.step(result["times_s"], result["running"], where="post",
                  label=f"{name}: {result['output_tokens_per_s']:.1f} tokens/s")
    axis.set_xlabel("seconds into the trace")
    axis.set_ylabel("requests decoding at once")
    axis.set_title(f"{report['requests']} requests in {report['kv_cache_tokens']} tokens of KV cache "
                   f"({report['checkpoint']})")
    axis.grid(True, alpha=0.3)
    axis.legend()
    save_chart(fig, path)


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--max_seq_len", type=int, default=2048)
    parser.add_argument("--budget_slots", type=int, default=4)
    parser.add_argument("--paged_max_batch", type=int, default=32)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt_min", type=int, default=32)
    parser.add_argument("--prompt_max", type=int, default=512)
    parser.add_argument("--output_min", type=int, default=16)
    parser.add_argument("--output_max", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ensure_checkpoint(args)
    model = ChatGLM2ForCausalLM.from_pretrained(args.model_path, max_seq_len=args.max_seq_len)
    rng = random.Random(args.seed)
    trace = [(rng.randint(args.prompt_min, args.prompt_max), rng.randint(args.output_min, args.output_max))
             for _ in range(args.requests)]
    budget = args.budget_slots * args.max_seq_len
    run(model, [(16, 2)], 2, budget)  # warm-up
    report = {"checkpoint": Path(args.model_path).name, "dtype": str(model.dtype).removeprefix("torch."),
              "threads": torch.get_num_threads(), "kv_cache_tokens": budget, "max_seq_len": args.max_seq_len,
              "requests": args.requests, "mean_tokens": sum(p + n for p, n in trace) / len(trace), "runs": {}}
    for name, max_batch in (("static slots", args.budget_slots), ("paged", args.paged_max_batch)):
        others = wait_until_quiet(args.max_wait_quiet)
        report["runs"][name] = dict(run(model, trace, max_batch, budget), others_cpu=others)
    print(model.kv_cache_summary())
    lines = [f"KV budget {budget} tokens ({args.budget_slots} x MAX_SEQ_LEN {args.max_seq_len}); {args.requests} "
             f"requests of {report['mean_tokens']:.0f} tokens on average (prompt + answer).\n",
             "| setting | max_batch | most decoding at once | mean decoding at once | preemptions | output tokens/s |",
             "|---|---|---|---|---|---|"]
    for name, r in report["runs"].items():
        lines.append(f"| {name} | {r['max_batch']} | {r['most_running']} | {r['mean_running']:.1f} | "
                     f"{r['preemptions']} | {r['output_tokens_per_s']:.1f} |")
    write_results(args.results_dir, "capacity", report, "\n".join(lines) + "\n", chart)


if __name__ == "__main__":
    main()
