"""What a long prompt arriving does to the answers already streaming: whole prefill against chunked prefill.

    python -m benchmarks.prefill_stall                    # full-width 4-layer random checkpoint (bench_ckpt_full_L4/)
    python -m benchmarks.prefill_stall --prompt_len 4096 --chunks none,1024,512,256

--streams requests decode (greedy, random weights, so every answer runs to its budget); once they have --warmup
tokens each, a prompt of --prompt_len tokens arrives. Per --chunks setting (the engine's max_prefill_tokens; "none" =
the whole prompt in one prefill, as before chunking), on one engine in one process: the longest gap between two tokens
of the streaming answers, from the arrival to their first token after the long prompt's first token; the long
prompt's time to first token; the streams' tokens/s over that time. A timeline chart shows each setting's streamed
tokens against time. Results go to benchmarks/results/prefill_stall.{json,md,png}.
"""
import time
from pathlib import Path

import torch

from benchmarks.report import benchmark_parser, save_chart, write_results
from benchmarks.run_suite import ensure_checkpoint, wait_until_quiet
from chatglm2.engine import Engine, SamplingParams
from modeling_chatglm_ascend import ChatGLM2ForCausalLM



def run(model, streams: int, warmup: int, prompt_len: int, chunk: int | None) -> dict:
    """One arrival; token times are seconds after it."""
    engine = Engine(model, streams + 1, max_prefill_tokens=chunk)
    prompt = list(range(1000, 1000 + prompt_len))
    answers = [engine.submit(list(range(2000 + 40 * i, 2040 + 40 * i)), SamplingParams(max_new_tokens=256))
               for i in range(streams)]
    while min(len(r.tokens) for r in answers) < warmup:
        engine.step()
    long = engine.submit(prompt, SamplingParams(max_new_tokens=2))
    arrival, times = time.perf_counter(), [0.0]
    while not long.tokens:
        if engine.step() == "decode":  # a token for every stream
            times.append(time.perf_counter() - arrival)
    ttft = time.perf_counter() - arrival
    while engine.step() != "decode":  # the streams' next token after it
        pass
    times.append(time.perf_counter() - arrival)
    for request in answers:
        request.cancel()
    engine.step()
    gaps = [b - a for a, b in zip(times, times[1:])] or [ttft]
    return {"max_prefill_tokens": chunk, "longest_gap_s": max(gaps), "long_prompt_ttft_s": ttft,
            "stream_tokens_per_s": streams * (len(times) - 1) / times[-1], "token_times_s": times}


def chart(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(8, 4.2))
    for name, run_ in report["runs"].items():
        times = run_["token_times_s"]
        line, = axis.step(times, range(len(times)), where="post", label=f"{name} (longest gap {run_['longest_gap_s']:.1f} s)")
        axis.axvline(run_["long_prompt_ttft_s"], color=line.get_color(), linestyle=":", alpha=0.7)
    axis.set_xlabel(f"seconds after a {report['prompt_len']}-token prompt arrives (dotted: its first token)")
    axis.set_ylabel(f"tokens of each of the {report['streams']} streaming answers")
    axis.set_title(f"max_prefill_tokens: whole prefill against chunks ({report['checkpoint']})")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    save_chart(fig, path)


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=4, help="tokens each stream has before the prompt arrives")
    parser.add_argument("--prompt_len", type=int, default=2048)
    parser.add_argument("--chunks", default="none,512,256", help="max_prefill_tokens settings, comma-separated")
    args = parser.parse_args()
    ensure_checkpoint(args)
    model = ChatGLM2ForCausalLM.from_pretrained(args.model_path, max_seq_len=args.prompt_len + 512)
    settings = [None if chunk == "none" else int(chunk) for chunk in args.chunks.split(",")]
    run(model, args.streams, 2, 64, 32)  # warm-up
    report = {"checkpoint": Path(args.model_path).name, "streams": args.streams, "prompt_len": args.prompt_len,
              "dtype": str(model.dtype), "threads": torch.get_num_threads(), "runs": {}}
    for chunk in settings:
        others = wait_until_quiet(args.max_wait_quiet)
        name = "whole prompt" if chunk is None else f"chunks of {chunk}"
        report["runs"][name] = dict(run(model, args.streams, args.warmup, args.prompt_len, chunk), others_cpu=others)
    lines = ["| max_prefill_tokens | longest gap between tokens (s) | long prompt's first token (s) | "
             "streams' tokens/s meanwhile |", "|---|---|---|---|"]
    for name, r in report["runs"].items():
        lines.append(f"| {name} | {r['longest_gap_s']:.2f} | {r['long_prompt_ttft_s']:.2f} | "
                     f"{r['stream_tokens_per_s']:.1f} |")
    write_results(args.results_dir, "prefill_stall", report, "\n".join(lines) + "\n", chart)


if __name__ == "__main__":
    main()
