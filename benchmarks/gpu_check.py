"""Everything that needs an NVIDIA GPU, in one run on a bare machine (PyTorch, transformers and sentencepiece only).

    bash benchmarks/gpu_check.sh                 # results in $OUT (or benchmarks/results/): gpu_check.{md,json}
    python -m benchmarks.gpu_check --device cpu --quick      # a smoke run of the same code on a CPU

1. Correctness on CUDA, small random checkpoint: logits and greedy tokens against transformers' GlmForCausalLM in
   fp32 and fp16; the compiled (CUDA-graph) decode against eager; W8A8 and weight-only int8/int4 on CUDA against the
   same weights on the CPU.
2. Speed on ChatGLM2-6B's shape (random fp16 weights drawn on the GPU and written as safetensors): time of the first
   token and per decode step at batch 1 and 8, prompts of 128 and 8192 tokens (the seed's 8192 in / 1024 out
   included), this project compiled and eager, transformers (eager, SDPA, dynamic cache), weight-only int8/int4, and
   the floor: weight bytes over the HBM read bandwidth measured here.
Each part is guarded, so one failure is recorded and the rest still runs; --budget_s skips what no longer fits.
"""
import argparse
import json
import platform
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks.torch_worker import transformers_runner
from chatglm2 import quant_export
from chatglm2.atomic import write_text_atomic
from chatglm2.device import synchronize
from chatglm2.performance import filled_prompt, time_generation
from chatglm2.quant_split import write_quant_parts
from chatglm2.random_checkpoint import FULL_WIDTH, write_demo_checkpoint
from chatglm2.tokenizer import ChatGLM2Tokenizer
from modeling_chatglm_ascend import ChatGLM2ForCausalLM
from tests.reference_glm import glm_reference

PROMPTS = ["你好", "今天天气怎么样？请问明天会下雨吗", "Write a short poem about the sea.", "1+1=?"]
SMALL = dict(num_layers=3, hidden_size=256, ffn_hidden_size=768, num_attention_heads=8, kv_channels=32)  # int4 groups fit
SPEED_SHAPES = [(1, 128, 128), (8, 128, 128), (32, 128, 128), (1, 8192, 1024), (8, 8192, 256), (32, 8192, 64)]
QUICK_SHAPES = [(1, 32, 16), (4, 32, 16)]


class Report:
    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.monotonic(), budget_s
        self.results: dict = {}

    def part(self, name: str, run, *args, needs_s: float = 0) -> None:
        """Run one part, recording its result or its error; skip it when it would not fit the time budget."""
        left = self.budget_s - (time.monotonic() - self.start)
        if left < needs_s:
            self.results[name] = {"skipped": f"{left:.0f} s of the budget left, needs ~{needs_s:.0f}"}
        else:
            try:
                self.results[name] = run(*args)
            except Exception as error:
                self.results[name] = {"error": f"{error.__class__.__name__}: {error}",
                                      "trace": traceback.format_exc()[-2000:]}
        print(f"[{time.monotonic() - self.start:6.0f} s] {name}: {json.dumps(self.results[name])[:400]}", flush=True)


def greedy_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a == b).float().mean().item()


def check_float(ckpt: Path, device: torch.device) -> dict:
    tokenizer = ChatGLM2Tokenizer.from_pretrained(ckpt)
    batch = tokenizer(PROMPTS)
    real = batch["attention_mask"].bool()
    reference = glm_reference(ckpt).to(device)
    with torch.no_grad():
        inputs = {k: v.to(device) for k, v in batch.items()}
        expected = reference(**inputs, position_ids=(inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)).logits.cpu()
        expected_ids = reference.generate(**inputs, max_new_tokens=16, do_sample=False, eos_token_id=2,
                                          pad_token_id=0)[:, batch["input_ids"].shape[1]:].cpu()
    out = {}
    for dtype in (torch.float32, torch.float16):
        eager = ChatGLM2ForCausalLM.from_pretrained(ckpt, device=device, dtype=dtype, compile="off")
        compiled = ChatGLM2ForCausalLM.from_pretrained(ckpt, device=device, dtype=dtype, compile="on")
        logits = eager(**batch).cpu()
        ids = eager.generate(**batch, max_new_tokens=16).cpu()
        compiled_ids = compiled.generate(**batch, max_new_tokens=16).cpu()
        cosine = torch.nn.functional.cosine_similarity(logits[real], expected[real], dim=-1)
        out[str(dtype).removeprefix("torch.")] = {
            "max_abs_logit_diff": (logits[real] - expected[real]).abs().max().item(),
            "cosine_min": cosine.min().item(), "greedy_agreement_vs_reference": greedy_agreement(ids, expected_ids),
            "compiled_equals_eager": torch.equal(ids, compiled_ids)}
    out["pass"] = out["float32"]["max_abs_logit_diff"] < 1e-3 and out["float32"]["greedy_agreement_vs_reference"] == 1 \
        and out["float16"]["cosine_min"] > 0.99 and all(out[d]["compiled_equals_eager"] for d in ("float32", "float16"))
    return out


def check_quantized(ckpt: Path, device: torch.device, work: Path) -> dict:
    """W8A8 and weight-only layers on `device` against the same weights on the CPU (fp32 activations)."""
    tokenizer = ChatGLM2Tokenizer.from_pretrained(ckpt)
    batch = tokenizer(PROMPTS)
    quant_dir = work / "w8a8"
    quant_export.export(ckpt, [tokenizer.encode(tokenizer.build_prompt(p)) for p in PROMPTS], quant_dir,
                        show_progress=False)
    write_quant_parts(ckpt, quant_dir, 1, show_progress=False)
    variants = {"w8a8": dict(quant_path=quant_dir), "int8": dict(quantize="int8"), "int4": dict(quantize="int4")}
    out = {}
    for name, options in variants.items():
        on_cpu = ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu", dtype=torch.float32, **options)
        expected, expected_ids = on_cpu(**batch), on_cpu.generate(**batch, max_new_tokens=12)
        for compile_mode in ("off", "on"):
            model = ChatGLM2ForCausalLM.from_pretrained(ckpt, device=device, dtype=torch.float32, compile=compile_mode,
                                                        **options)
            cosine = torch.nn.functional.cosine_similarity(model(**batch).cpu()[:, -1], expected[:, -1], dim=-1)
            out[f"{name}, compile {compile_mode}"] = {
                "cosine_min_vs_cpu": cosine.min().item(),
                "greedy_agreement_vs_cpu": greedy_agreement(model.generate(**batch, max_new_tokens=12).cpu(),
                                                            expected_ids)}
    return out


def hbm_read_gbps(device: torch.device) -> float:
    buffer = torch.empty(2 ** 30, dtype=torch.float16, device=device)  # 2 GiB
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        buffer.sum()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 2 / best / 1e9


def time_ours(model, tokenizer: ChatGLM2Tokenizer, shapes: list[tuple[int, int, int]]) -> list[dict]:
    rows = []
    for batch, seq_in, seq_out in shapes:
        ids = filled_prompt(tokenizer, seq_in, batch)
        time_generation(model, ids, 2)  # allocation, compilation and capture for this batch: load time, not timed
        times = time_generation(model, ids, seq_out)
        rows.append({"batch": batch, "in": seq_in, "out": seq_out, "first_token_ms": times.prefill_s * 1000,
                     "decode_ms_median": statistics.median(times.step_s) * 1000,
                     "first_row_tokens": times.tokens[0, :32].tolist()})  # greedy: compiled and eager must agree
    return rows


def time_transformers(config: dict, device: torch.device, shapes: list[tuple[int, int, int]]) -> list[dict]:
    from transformers import GlmConfig, GlmForCausalLM

    glm = GlmConfig(vocab_size=config["padded_vocab_size"], hidden_size=config["hidden_size"],
                    intermediate_size=config["ffn_hidden_size"], num_hidden_layers=config["num_layers"],
                    num_attention_heads=config["num_attention_heads"], num_key_value_heads=2,
                    head_dim=config["kv_channels"], attention_bias=True, attn_implementation="sdpa", pad_token_id=0,
                    eos_token_id=2, bos_token_id=1,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    torch.set_default_dtype(torch.float16)
    with torch.device(device):
        model = GlmForCausalLM(glm).eval()
    torch.set_default_dtype(torch.float32)
    run = transformers_runner(model, device)
    rows = []
    for batch, seq_in, seq_out in shapes:
        ids = torch.randint(100, 1000, (batch, seq_in))
        run(ids, 2)
        prefill_s, step_s = run(ids, seq_out)
        rows.append({"batch": batch, "in": seq_in, "out": seq_out, "first_token_ms": prefill_s * 1000,
                     "decode_ms_median": statistics.median(step_s) * 1000})
    return rows


VARIANTS = {"compiled": dict(compile="on"), "eager": dict(compile="off"), "int8": dict(compile="on", quantize="int8"),
            "int4": dict(compile="on", quantize="int4"), "transformers": None}


def speed(ckpt: Path, device: torch.device, shapes: list[tuple[int, int, int]], variants: list[str], report: Report,
          quick: bool) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    max_seq_len = max(i + o for _, i, o in shapes)
    report.part("hbm_read_GBps", hbm_read_gbps, device)
    for variant in variants:
        if variant == "transformers":
            report.part("transformers fp16 (eager, SDPA)", time_transformers, config, device, shapes[:2],
                        needs_s=20 if quick else 90)
            continue
        options = VARIANTS[variant]
        name = f"ours {options.get('quantize', 'fp16')}{' weight-only' if 'quantize' in options else ''}, " \
               f"{'compiled' if options['compile'] == 'on' else 'eager'}"

        def run(options: dict = options, name: str = name) -> dict:
            start = time.perf_counter()
            model = ChatGLM2ForCausalLM.from_pretrained(ckpt, device=device, dtype=torch.float16,
                                                        max_seq_len=max_seq_len, **options)
            load_s = time.perf_counter() - start
            weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
            rows = time_ours(model, ChatGLM2Tokenizer.from_pretrained(ckpt), shapes if "fp16" in name else shapes[:1])
            del model
            torch.cuda.empty_cache()  # a no-op without CUDA
            return {"load_s": load_s, "weight_bytes": weight_bytes, "runs": rows}
        report.part(name, run, needs_s=30 if quick else 120)


def markdown(report: dict) -> str:
    lines = [f"# gpu_check: {report['device_name']}, torch {report['torch']}, {report['date']}", ""]
    floor_bw = report["results"].get("hbm_read_GBps")
    for name, result in report["results"].items():
        if isinstance(result, dict) and "runs" in result:
            lines += [f"## {name} (load {result['load_s']:.0f} s)" if "load_s" in result else f"## {name}", "",
                      "| batch | in | out | first token (ms) | ms per token | x floor |", "|---|---|---|---|---|---|"]
            for run in result["runs"]:
                floor = result.get("weight_bytes", 0) / (floor_bw * 1e9) * 1000 if isinstance(floor_bw, float) else 0
                ratio = f"{run['decode_ms_median'] / floor:.2f}" if floor else "-"
                lines.append(f"| {run['batch']} | {run['in']} | {run['out']} | {run['first_token_ms']:.1f} | "
                             f"{run['decode_ms_median']:.2f} | {ratio} |")
            lines.append("")
        else:
            lines += [f"## {name}", "", "```", json.dumps(result, indent=1)[:3000], "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="small shapes only (a smoke run, e.g. on a CPU)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--work_dir", default=None, help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--budget_s", type=float, default=450, help="skip what would not fit in this many seconds")
    parser.add_argument("--parts", default="float,quantized,speed", help="which of float, quantized, speed to run")
    parser.add_argument("--shapes", default=None,
                        help="speed shapes as BATCHxINxOUT,... (default: 1x128x128,8x128x128,1x8192x1024,8x8192x256)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"speed rows, from {', '.join(VARIANTS)}")
    args = parser.parse_args()
    device = torch.device(args.device)
    report = Report(args.budget_s)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"gpu_check on {name}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        work = Path(work)
        parts = args.parts.split(",")
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")] if args.shapes else \
            QUICK_SHAPES if args.quick else SPEED_SHAPES
        small = write_demo_checkpoint(work / "small", safetensors=True, **SMALL)
        if "float" in parts:
            report.part("correctness: float (fp32, fp16) and compiled vs eager", check_float, small, device)
        if "quantized" in parts:
            report.part("correctness: W8A8, int8 and int4 weight-only vs CPU", check_quantized, small, device, work)
        if "speed" in parts and args.quick:
            speed(small, device, shapes, args.variants.split(","), report, quick=True)
        elif "speed" in parts:
            full = write_demo_checkpoint(work / "full", num_layers=28, num_shards=8, safetensors=True,
                                         device=args.device, **FULL_WIDTH)
            speed(full, device, shapes, args.variants.split(","), report, quick=False)
    result = {"device_name": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "elapsed_s": time.monotonic() - report.start, "results": report.results}
    out = Path(args.out)
    write_text_atomic(out / "gpu_check.json", json.dumps(result, indent=1) + "\n")
    write_text_atomic(out / "gpu_check.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
