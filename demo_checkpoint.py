"""A random-weight checkpoint of ChatGLM2-6B, ChatGLM3-6B or GLM-4-9B-chat in the exact Hugging Face layout, so
every mode runs with no download.

Its tokenizer is trained on assets/tokenizer_corpus.txt (SentencePiece for ChatGLM2/3, BPE ranks with the real ids
of the special tokens for GLM-4). Random weights talk nonsense: the demo shows that the pipeline works, not what the
real model says.

    python demo_checkpoint.py demo_ckpt                        # small and quick
    python demo_checkpoint.py glm4_ckpt --family glm4          # GLM-4-9B-chat's files, tokenizer and chat template
    python demo_checkpoint.py bench_ckpt --full_width --num_layers 4   # ChatGLM2-6B's width, for benchmarks
"""
import argparse

from chatglm2.cli import run_cli
from chatglm2.random_checkpoint import FAMILIES, full_width, write_demo_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="folder to write: new, empty, or one this command wrote (which is replaced)")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="chatglm2",
                        help="whose files to write: chatglm2 (ChatGLM2-6B), chatglm3 (ChatGLM3-6B), glm4 (GLM-4-9B-chat)")
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--ffn_hidden_size", type=int, default=688)
    parser.add_argument("--num_attention_heads", type=int, default=8)
    parser.add_argument("--padded_vocab_size", type=int, default=None)
    parser.add_argument("--full_width", action="store_true",
                        help="the real width: hidden 4096, FFN 13696, 32 heads of 128, vocab 65024 (GLM-4: 151552)")
    parser.add_argument("--num_shards", type=int, default=2)
    parser.add_argument("--safetensors", action="store_true", help="write *.safetensors instead of pytorch_model-*.bin")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shape = dict(hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
                 num_attention_heads=args.num_attention_heads, padded_vocab_size=args.padded_vocab_size)
    if args.full_width:
        shape = full_width(args.family)
    path = write_demo_checkpoint(args.path, num_layers=args.num_layers, num_shards=args.num_shards,
                                 safetensors=args.safetensors, seed=args.seed, family=args.family, **shape)
    print(f"wrote a random-weight {args.family} checkpoint to {path} (random weights: its answers are nonsense)")


if __name__ == "__main__":
    run_cli(main)
