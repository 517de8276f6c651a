"""C-Eval stage 1 through the engine: questions streaming through --batch slots against static batches.

    python -m benchmarks.ceval_streaming [--questions 48] [--batch 8] [--max_new_tokens 128]

Random weights never say EOS, so every answer would run to the budget and both ways would take equally long. This
benchmark gives the EOS token's output row a larger scale, so that answers end at different lengths, as a real
model's do. It then times main.py's stage 1 (the generation that takes nearly all of C-Eval's time) on the same
questions two ways, in one process, on the same engine: static batches of --batch (each batch waits for its longest
answer; what main.py did before the engine) and streaming (a finished answer's slot takes the next question at once;
what it does now). The predictions of the full protocol are compared too: they must be identical.
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch

from chatglm2.ceval import answer_questions
from chatglm2.checkpoint import iter_tensors, read_config, write_checkpoint
from chatglm2.engine import Engine
from chatglm2.random_checkpoint import CORPUS, write_demo_checkpoint
from modeling_chatglm_ascend import ChatGLM2ForCausalLM, ChatGLM2Tokenizer

SHAPE = dict(num_layers=4, hidden_size=1024, ffn_hidden_size=2752, num_attention_heads=16, kv_channels=64)


def checkpoint_that_stops(path: Path, eos_scale: float) -> Path:
    """A random checkpoint whose EOS logit is scaled up, so some answers end early and others run long."""
    source = write_demo_checkpoint(path.parent / "source", **SHAPE)
    tensors = dict(iter_tensors(source))
    tensors["transformer.output_layer.weight"][2] *= eos_scale
    write_checkpoint(path, read_config(source), [tensors], 1, source)
    return path


def questions(count: int) -> list[str]:
    lines = [line.strip() for line in CORPUS.read_text(encoding="utf-8").splitlines() if len(line.strip()) > 10]
    return [f"{lines[i % len(lines)]}\nA. 甲\nB. 乙\nC. 丙\nD. 丁" for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--eos_scale", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        ckpt = checkpoint_that_stops(Path(work) / "ckpt", args.eos_scale)
        model = ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu", dtype=torch.float32, max_seq_len=512)
        tokenizer = ChatGLM2Tokenizer.from_pretrained(ckpt)
        engine = Engine(model, args.batch)
        todo = questions(args.questions)
        answer_questions(engine, tokenizer, todo[:args.batch], 4, args.batch)  # warm-up
        start = time.perf_counter()
        static = []
        for first in range(0, len(todo), args.batch):
            static += answer_questions(engine, tokenizer, todo[first:first + args.batch], args.max_new_tokens,
                                       args.batch)[0]
        static_s = time.perf_counter() - start
        start = time.perf_counter()
        streamed = answer_questions(engine, tokenizer, todo, args.max_new_tokens, args.batch)[0]
        streamed_s = time.perf_counter() - start
    print(f"{args.questions} questions, --batch {args.batch}, up to {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"static batches: {static_s:.1f} s; streaming through the slots: {streamed_s:.1f} s "
          f"({static_s / streamed_s:.2f}x faster); predictions identical: {static == streamed}")


if __name__ == "__main__":
    main()
