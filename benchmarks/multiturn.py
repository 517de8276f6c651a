"""Time to the first token of each turn of a chat, as the conversation grows: prefix caching on against off.

    python -m benchmarks.multiturn                        # full-width 4-layer random checkpoint (bench_ckpt_full_L4/)
    python -m benchmarks.multiturn --turns 10 --answer_tokens 48

One conversation per setting, on one model in one process: every turn asks the same message (about --query_tokens
tokens) with the whole conversation so far as history (ChatGLM2's build_prompt, as stream_chat, cli_demo and the web
demo send it), and the model's greedy answer of --answer_tokens tokens joins the history. "off" prefills the whole
conversation every turn, as every version before the KV pool did; "on" finds the earlier turns in the cache and
prefills the rest. The settings take turns, so the machine's noise falls on both. Results go to
benchmarks/results/multiturn.{json,md,png}.
"""
import time
from pathlib import Path

import torch

from benchmarks.report import benchmark_parser, save_chart, write_results
from benchmarks.run_suite import ensure_checkpoint, wait_until_quiet
from chatglm2.engine import Engine
from modeling_chatglm_ascend import ChatGLM2ForCausalLM, ChatGLM2Tokenizer
QUERY = "请用三句话介绍一下长城的历史，并说明它为什么重要。What makes a good travel plan for a week in Beijing? "


def turn(model, tokenizer, history: list[tuple[str, str]], query: str, answer_tokens: int,
         prefix_caching: bool) -> dict:
    """One turn: its prompt's length, the seconds to its first token, the prompt tokens found cached, the answer."""
    prompt_ids = tokenizer(tokenizer.build_prompt(query, history))["input_ids"]
    pool = model.kv_blocks
    hits = pool.hit_tokens
    start = time.perf_counter()
    stream = model.generate_stream(prompt_ids, max_new_tokens=answer_tokens, ignore_eos=True,
                                   prefix_caching=prefix_caching)
    tokens = [int(next(stream)[0])]
    ttft = time.perf_counter() - start
    tokens += [int(token[0]) for token in stream]
    return {"prompt_tokens": prompt_ids.shape[1], "ttft_s": ttft, "cached_tokens": pool.hit_tokens - hits,
            "answer": tokenizer.decode(tokens).strip()}


def chart(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4.2))
    for name, turns in report["runs"].items():
        axis.plot([t["prompt_tokens"] for t in turns], [t["ttft_s"] for t in turns], marker="o",
                  label=f"prefix caching {name}")
    axis.set_xlabel("prompt tokens of the turn (the conversation so far and the new message)")
    axis.set_ylabel("seconds to the first token")
    axis.set_title(f"Time to first token per chat turn ({report['checkpoint']}, {report['dtype']})")
    axis.set_ylim(bottom=0)
    axis.grid(True, alpha=0.3)
    axis.legend()
    save_chart(fig, path)


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--answer_tokens", type=int, default=48)
    parser.add_argument("--query_repeats", type=int, default=3, help="the message is QUERY this many times")
    parser.add_argument("--max_seq_len", type=int, default=8192)
    args = parser.parse_args()
    ensure_checkpoint(args)
    model = ChatGLM2ForCausalLM.from_pretrained(args.model_path, max_seq_len=args.max_seq_len)
    tokenizer = ChatGLM2Tokenizer.from_pretrained(args.model_path)
    Engine(model, 1)  # the pool of a batch of one, which every turn reuses
    turn(model, tokenizer, [], "warm-up", 2, False)
    query = QUERY * args.query_repeats
    report = {"checkpoint": Path(args.model_path).name, "dtype": str(model.dtype).removeprefix("torch."),
              "threads": torch.get_num_threads(), "answer_tokens": args.answer_tokens,
              "kv_cache": model.kv_cache_summary(),
              "runs": {"off": [], "on": []}, "others_cpu": []}
    histories = {"off": [], "on": []}
    model.kv_blocks.forget()
    for _ in range(args.turns):
        for name in ("off", "on"):
            report["others_cpu"].append(wait_until_quiet(args.max_wait_quiet))
            result = turn(model, tokenizer, histories[name], query, args.answer_tokens, name == "on")
            histories[name].append((query, result.pop("answer")))
            report["runs"][name].append(result)
    lines = ["| turn | prompt tokens | TTFT off (s) | TTFT on (s) | cached tokens (on) | on / off |",
             "|---|---|---|---|---|---|"]
    for k, (off, on) in enumerate(zip(report["runs"]["off"], report["runs"]["on"])):
        lines.append(f"| {k + 1} | {on['prompt_tokens']} | {off['ttft_s']:.2f} | {on['ttft_s']:.2f} | "
                     f"{on['cached_tokens']} | {on['ttft_s'] / off['ttft_s']:.2f} |")
    first, last = report["runs"]["on"][0], report["runs"]["on"][-1]
    summary = (f"\nWith prefix caching, the last turn ({last['prompt_tokens']} prompt tokens) takes "
               f"{last['ttft_s'] / first['ttft_s']:.2f}x the first turn's time to first token "
               f"({first['prompt_tokens']} tokens, no history).\n")
    print(report["kv_cache"])
    write_results(args.results_dir, "multiturn", report, "\n".join(lines) + "\n" + summary, chart)


if __name__ == "__main__":
    main()
