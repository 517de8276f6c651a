"""Decode speed of W8A8 against bf16 on CPU, side by side in one process, rounds interleaved (the machine is shared).

    python demo_checkpoint.py /tmp/fw --full_width --num_layers 2
    python export_quant_weight.py --float_weight /tmp/fw --data_path calib.jsonl --quant_weight /tmp/fwq
    ENABLE_QUANT=1 QUANT_WEIGHT_PATH=/tmp/fwq python process_weights.py --model_path /tmp/fw --tp_size 1
    python -m benchmarks.quant_speed /tmp/fw /tmp/fwq
"""
import argparse
import os
import statistics
import time

import torch

from modeling_chatglm_ascend import ChatGLM2ForCausalLM


def decode_step_ms(model: ChatGLM2ForCausalLM, prompt_len: int, steps: int) -> float:
    """Median time between generated tokens after the prefill."""
    input_ids = torch.arange(100, 100 + prompt_len)[None]
    stamps = [time.perf_counter() for _ in model.generate_stream(input_ids, max_new_tokens=steps + 1, ignore_eos=True)]
    return statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:])) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_path")
    parser.add_argument("quant_weight_path")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {"bf16": ChatGLM2ForCausalLM.from_pretrained(args.model_path, device="cpu", dtype=torch.bfloat16)}
    models["w8a8"] = ChatGLM2ForCausalLM.from_pretrained(args.model_path, device="cpu", dtype=torch.bfloat16,
                                                         quant_path=args.quant_weight_path)
    times = {name: [] for name in models}
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name, model in models.items():
            times[name].append(decode_step_ms(model, args.prompt_len, args.steps))
    best = {name: min(values) for name, values in times.items()}
    print(f"threads {torch.get_num_threads()}, load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}")
    for name, values in times.items():
        print(f"{name}: decode step {best[name]:.1f} ms (best of rounds: {', '.join(f'{v:.1f}' for v in values)})")
    print(f"w8a8 / bf16 time: {best['w8a8'] / best['bf16']:.2f}  (speed-up {best['bf16'] / best['w8a8']:.2f}x)")


if __name__ == "__main__":
    main()
