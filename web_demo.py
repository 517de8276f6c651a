"""The chat page (Gradio) of ChatGLM2-6B, ChatGLM3-6B or GLM-4-9B-chat, as THUDM's web_demo.py, served from this
project's model (with a system prompt box for ChatGLM3 and GLM-4).

    python web_demo.py --model_path CKPT
    torchrun --nproc_per_node N --master_port 2000 web_demo.py --model_path CKPT --tp_size N

Rank 0 serves the page and schedules the engine; the other ranks follow its plan. See chatglm2/web_page.py.
"""
import argparse
import signal
import sys
from pathlib import Path

from chatglm2.cli import ArgumentParser, add_model_args, add_server_args, run_cli, serve
from chatglm2.engine import Engine
from chatglm2.tokenizer import MODEL_NAMES, ChatGLM2Tokenizer
from chatglm2.web_page import build_page


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="web_demo.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_server_args(parser, default_port=7860, default_max_batch=4)
    parser.add_argument("--share", action="store_true", help="also publish the page through a Gradio share link")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def run_page(engine: Engine, tokenizer: ChatGLM2Tokenizer) -> None:
        # torchrun and service managers stop with SIGTERM; make it close the server like Ctrl+C does.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        model = engine.model
        title = (f"{MODEL_NAMES[tokenizer.chat_family][0]} ({Path(args.model_path).resolve().name}) on {model.device.type.upper()}, "
                 f"{str(model.dtype).removeprefix('torch.')}, tp_size {args.tp_size}")
        build_page(engine, tokenizer, title).queue(default_concurrency_limit=args.max_batch).launch(
            server_name=args.server_name, server_port=args.server_port, share=args.share)

    serve(args, run_page)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
