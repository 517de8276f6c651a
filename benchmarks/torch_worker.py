"""One PyTorch engine timed in its own process (so its peak memory is its own); prints one JSON result line.

    python -m benchmarks.torch_worker --engine ours --model_path CKPT --dtype bf16 --batches 1,8
    python -m benchmarks.torch_worker --engine transformers --model_path CKPT --dtype fp32
    python -m benchmarks.torch_worker --engine ours --model_path CKPT --dtype bf16 --quantize int4

ours: this project's ChatGLM2ForCausalLM, timed exactly as `main.py --mode performance` times it; with --quantize,
weight-only int8 / int4 (the weights quantized while they load, as `main.py --quantize` does).
transformers: GlmForCausalLM with the checkpoint loaded as the parity tests load it (tests/reference_glm.py), SDPA
attention, a DynamicCache, and the same greedy loop: one prefill over the prompt, then one-token decode steps.
"""
import argparse
import time
from typing import Callable

import torch

from benchmarks.common import emit, peak_rss_bytes, prompt_ids, reset_peak_rss, rss_bytes, timing_summary
from chatglm2.checkpoint import read_config
from chatglm2.device import synchronize
from chatglm2.weight_only import DEFAULT_GROUP_SIZE

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WARMUP_NEW_TOKENS = 2

# (input_ids [batch, prompt], new tokens) -> (prefill seconds, decode step seconds)
Runner = Callable[[torch.Tensor, int], tuple[float, list[float]]]


def load_ours(model_path: str, device: torch.device, dtype: torch.dtype, max_seq_len: int,
              args: argparse.Namespace) -> Runner:
    from chatglm2.performance import time_generation
    from modeling_chatglm_ascend import ChatGLM2ForCausalLM

    model = ChatGLM2ForCausalLM.from_pretrained(model_path, device=device, dtype=dtype, max_seq_len=max_seq_len,
                                                quantize=args.quantize, group_size=args.group_size,
                                                quantize_output_layer=args.quantize_output_layer,
                                                quantize_attention=args.quantize_attention,
                                                quantize_activations=args.quantize_activations)

    def run(input_ids: torch.Tensor, new_tokens: int) -> tuple[float, list[float]]:
        times = time_generation(model, input_ids, new_tokens)
        return times.prefill_s, times.step_s
    return run


def load_transformers(model_path: str, device: torch.device, dtype: torch.dtype, max_seq_len: int,
                      args: argparse.Namespace) -> Runner:
    from tests.reference_glm import glm_reference

    model = glm_reference(model_path).to(device=device, dtype=dtype)
    model.set_attn_implementation("sdpa")  # transformers' default; the parity loader picks eager for exactness
    return transformers_runner(model, device)


def transformers_runner(model, device: torch.device) -> Runner:
    """transformers' own greedy loop, timed: one prefill, then one-token steps on its dynamic cache."""
    @torch.inference_mode()
    def run(input_ids: torch.Tensor, new_tokens: int) -> tuple[float, list[float]]:
        input_ids = input_ids.to(device)
        synchronize(device)
        start = time.perf_counter()
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        synchronize(device)
        stamps = [time.perf_counter()]
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, cache=out.cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            synchronize(device)
            stamps.append(time.perf_counter())
        return stamps[0] - start, [later - earlier for earlier, later in zip(stamps, stamps[1:])]
    return run


LOADERS = {"ours": load_ours, "transformers": load_transformers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=LOADERS, required=True)
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--dtype", choices=DTYPES, required=True)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per batch size")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None, help="ours: weight-only quantization")
    parser.add_argument("--group_size", type=int, default=DEFAULT_GROUP_SIZE, help="ours: int4 group size")
    parser.add_argument("--quantize_output_layer", choices=("auto", "int8", "int4"), default="auto",
                        help="ours with --quantize: output_layer's format (auto: as --quantize)")
    parser.add_argument("--quantize_attention", choices=("auto", "int8", "int4"), default="auto",
                        help="ours with --quantize: query_key_value and self_attention.dense (auto: as --quantize)")
    parser.add_argument("--quantize_activations", choices=("int8",), default=None,
                        help="ours with int8 layers: round their activation rows to 8 bits (fbgemm on x86)")
    args = parser.parse_args()
    if args.quantize and args.engine != "ours":
        parser.error("--quantize applies to --engine ours only")
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    batches = [int(b) for b in args.batches.split(",")]
    vocab_size = read_config(args.model_path)["padded_vocab_size"]

    start = time.perf_counter()
    run = LOADERS[args.engine](args.model_path, device, dtype, args.prompt_len + args.new_tokens, args)
    load = {"load_s": time.perf_counter() - start, "load_peak_rss": peak_rss_bytes(), "loaded_rss": rss_bytes()}
    peak_reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    for batch in batches:
        input_ids = torch.tensor([prompt_ids(args.prompt_len, vocab_size)] * batch)
        run(input_ids, WARMUP_NEW_TOKENS)
        prefills, steps = [], []
        for _ in range(args.repeats):
            prefill_s, step_s = run(input_ids, args.new_tokens)
            prefills.append(prefill_s)
            steps.append(step_s)
        runs.append(timing_summary(batch, args.prompt_len, prefills, steps))
    emit({"engine": args.engine, "dtype": args.dtype, "quantize": args.quantize, "device": args.device,
          "threads": torch.get_num_threads(),
          "runs": runs, **load, "run_peak_rss": peak_rss_bytes(), "run_peak_is_run_only": peak_reset,
          "peak_device_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None})


if __name__ == "__main__":
    main()
