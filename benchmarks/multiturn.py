"""Time to the first token of each turn of a chat, as the conversation grows: prefix caching on against off.

    python -m benchmarks.multiturn                        # full-width 4-layer random checkpoint (bench_ckpt_full_L4/)
    python -m benchmarks.multiturn --turns 13 --api         # and through /v1/chat/completions

One conversation per setting, on one model in one process: every turn asks the same message (QUERY --query_repeats
times, about 150 tokens) with the whole conversation so far as history (ChatGLM2's build_prompt, as stream_chat,
cli_demo and the web demo send it), and the model's greedy answer of --answer_tokens tokens joins the history. "off"
prefills the whole conversation every turn, as every version before the KV pool did; "on" finds the earlier turns in
the cache and prefills the rest. The settings take turns, so the machine's noise falls on both. With --api the same
conversation then goes through openai_api.py, the history in `messages` (a server with --no_prefix_caching and one
without). Results go to benchmarks/results/multiturn.{json,md,png}.
"""
import time
from pathlib import Path

import httpx
import torch

from benchmarks.common import start_openai_api
from benchmarks.report import benchmark_parser, line_chart, write_results
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
    line_chart(path, {f"prefix caching {name}": ([t["prompt_tokens"] for t in turns], [t["ttft_s"] for t in turns])
                      for name, turns in report["runs"].items()},
               "prompt tokens of the turn (the conversation so far and the new message)", "seconds to the first token",
               f"Time to first token per chat turn ({report['checkpoint']}, {report['dtype']})")


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--answer_tokens", type=int, default=48)
    parser.add_argument("--query_repeats", type=int, default=3, help="the message is QUERY this many times")
    parser.add_argument("--max_seq_len", type=int, default=8192)
    parser.add_argument("--api", action="store_true",
                        help="also hold the conversation through openai_api.py (two servers, caching on and off)")
    parser.add_argument("--port", type=int, default=8770, help="the API servers' ports: this and the next")
    args = parser.parse_args()
    ensure_checkpoint(args)
    model = ChatGLM2ForCausalLM.from_pretrained(args.model_path, max_seq_len=args.max_seq_len)
    tokenizer = ChatGLM2Tokenizer.from_pretrained(args.model_path)
    Engine(model, 1)  # the pool of a batch of one, which every turn reuses
    turn(model, tokenizer, [], "warm-up", 2, False)
    query = QUERY * args.query_repeats
    report = {"checkpoint": Path(args.model_path).name, "dtype": str(model.dtype).removeprefix("torch."),
              "threads": torch.get_num_threads(), "answer_tokens": args.answer_tokens,
              "kv_cache": model.kv_cache_summary(), "runs": {"off": [], "on": []}, "others_cpu": []}
    histories = {"off": [], "on": []}
    model.kv_blocks.forget()
    for _ in range(args.turns):
        for name in ("off", "on"):
            report["others_cpu"].append(wait_until_quiet(args.max_wait_quiet))
            result = turn(model, tokenizer, histories[name], query, args.answer_tokens, name == "on")
            histories[name].append((query, result.pop("answer")))
            report["runs"][name].append(result)
    if args.api:
        del model
        report["runs"].update(api_turns(args, query))
    print(report["kv_cache"])
    tables = [table(report["runs"], "off", "on", "the library (stream_chat's path)")]
    if args.api:
        tables.append(table(report["runs"], "off, API", "on, API", "/v1/chat/completions"))
    write_results(args.results_dir, "multiturn", report, "\n".join(tables), chart)


def api_turns(args, query: str) -> dict[str, list[dict]]:
    """The same conversation through openai_api.py's /v1/chat/completions, one server with prefix caching and one
    without: each turn's time to first token is that of a max_tokens=1 request; a second request gets the answer."""
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    servers = {name: start_openai_api(args.model_path, args.port + i, results / f"multiturn-{i}.log", *flags,
                                      MAX_SEQ_LEN=str(args.max_seq_len))
               for i, (name, flags) in enumerate((("off, API", ["--no_prefix_caching"]), ("on, API", [])))}
    runs = {name: [] for name in servers}
    messages = {name: [] for name in servers}
    try:
        with httpx.Client(timeout=600) as client:
            for _ in range(args.turns):
                for i, name in enumerate(servers):
                    url = f"http://127.0.0.1:{args.port + i}/v1/chat/completions"
                    body = {"model": "m", "messages": messages[name] + [{"role": "user", "content": query}],
                            "temperature": 0}
                    wait_until_quiet(args.max_wait_quiet)
                    start = time.perf_counter()
                    first = client.post(url, json={**body, "max_tokens": 1}).json()
                    ttft = time.perf_counter() - start
                    answer = client.post(url, json={**body, "max_tokens": args.answer_tokens}).json()
                    runs[name].append({"prompt_tokens": first["usage"]["prompt_tokens"], "ttft_s": ttft,
                                       "cached_tokens": first["usage"]["prompt_tokens_details"]["cached_tokens"]})
                    messages[name] = body["messages"] + [answer["choices"][0]["message"]]
    finally:
        for process in servers.values():
            process.terminate()
            process.wait(timeout=120)
    return runs


def table(runs: dict[str, list[dict]], off: str, on: str, title: str) -> str:
    lines = [f"Through {title}:\n", "| turn | prompt tokens | TTFT off (s) | TTFT on (s) | cached tokens (on) | on / off |",
             "|---|---|---|---|---|---|"]
    for k, (a, b) in enumerate(zip(runs[off], runs[on])):
        lines.append(f"| {k + 1} | {b['prompt_tokens']} | {a['ttft_s']:.2f} | {b['ttft_s']:.2f} | "
                     f"{b['cached_tokens']} | {b['ttft_s'] / a['ttft_s']:.2f} |")
    first, last = runs[on][0], runs[on][-1]
    lines.append(f"\nWith prefix caching, the last turn ({last['prompt_tokens']} prompt tokens) takes "
                 f"{last['ttft_s'] / first['ttft_s']:.2f}x the first turn's time to first token "
                 f"({first['prompt_tokens']} tokens, no history).\n")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
