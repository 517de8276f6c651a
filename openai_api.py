"""An OpenAI-compatible API for ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B-chat (THUDM's openai_api.py, on this project's
continuous-batching engine), with tool calling for ChatGLM3 and GLM-4.

    python openai_api.py --model_path CKPT                        # http://127.0.0.1:8000/v1
    torchrun --nproc_per_node N --master_port 2000 openai_api.py --model_path CKPT --tp_size N

Requests from many clients are answered together: up to --max_batch at once, each in its own KV-cache slot, more
waiting in a bounded queue (503 with Retry-After when it is full). Under tensor parallel rank 0 serves and
schedules; the other ranks follow its plan.
"""
import argparse
import sys
from pathlib import Path

import uvicorn

from chatglm2.cli import ArgumentParser, add_model_args, add_server_args, ignore_stop_signals, run_cli, serve
from chatglm2.engine import Engine
from chatglm2.openai_server import OpenAIServer, build_app
from chatglm2.tokenizer import MODEL_NAMES, ChatGLM2Tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="openai_api.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_server_args(parser, default_port=8000, default_max_batch=8)
    parser.add_argument("--api_key", default=None,
                        help="when given, every request must carry the header Authorization: Bearer API_KEY")
    parser.add_argument("--max_waiting", type=int, default=64,
                        help="requests that may wait for a slot; beyond that the server answers 503 (default 64)")
    parser.add_argument("--model_name", default=None,
                        help="the model id /v1/models lists (default: chatglm2-6b, chatglm3-6b or glm-4-9b-chat, as the "
                             "checkpoint's tokenizer says)")
    args = parser.parse_args(argv)
    if args.max_waiting < 0:
        parser.error(f"--max_waiting must be at least 0, got {args.max_waiting}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def run_api(engine: Engine, tokenizer: ChatGLM2Tokenizer) -> None:
        model_name = args.model_name or MODEL_NAMES[tokenizer.chat_family][1]
        app = build_app(OpenAIServer(engine, tokenizer, model_name, args.api_key))
        print(f"serving {Path(args.model_path).resolve().name} as {model_name!r} at "
              f"http://{args.server_name}:{args.server_port}/v1 (max_batch {args.max_batch})", flush=True)
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again under the handler that was
        # there before it: let that one ignore it, so a stopped server exits with status 0.
        ignore_stop_signals()
        uvicorn.run(app, host=args.server_name, port=args.server_port, log_level="warning")

    serve(args, run_api, args.max_waiting)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
