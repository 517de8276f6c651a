"""ChatGLM2-6B chat page (Gradio), as THUDM's web_demo.py, served from this project's model.

    python web_demo.py --model_path CKPT
    torchrun --nproc_per_node N --master_port 2000 web_demo.py --model_path CKPT --tp_size N

Rank 0 serves the page; see chatglm2/web_page.py.
"""
import argparse
import queue
import signal
import sys
import threading

from chatglm2 import collectives
from chatglm2.cli import ArgumentParser, add_model_args, load_model_and_tokenizer, run_cli
from chatglm2.web_page import Request, build_page, check_port_free, ignore_stop_signals, model_loop


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="web_demo.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--server_name", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 opens the page to the network (the reference's choice)")
    parser.add_argument("--server_port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also publish the page through a Gradio share link")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank0 = collectives.launched_rank() == 0
    if rank0:
        check_port_free(args.server_name, args.server_port)
    model, tokenizer = load_model_and_tokenizer(args)
    if not rank0:
        # Ctrl+C and torchrun's SIGTERM reach every rank; these leave when rank 0 says so, never mid-collective.
        ignore_stop_signals()
        model_loop(model, tokenizer)
        collectives.shutdown()
        return

    requests: "queue.Queue[Request | None]" = queue.Queue()
    stopping = threading.Event()
    worker = threading.Thread(target=model_loop, args=(model, tokenizer, requests, stopping), name="model")
    worker.start()
    # torchrun and service managers stop with SIGTERM; make it close the server like Ctrl+C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        build_page(model, tokenizer, args, requests).queue(default_concurrency_limit=1).launch(
            server_name=args.server_name, server_port=args.server_port, share=args.share)
    finally:
        ignore_stop_signals()  # the terminal's and torchrun's signals come in pairs: let the second not cut this short
        stopping.set()  # nobody reads the answer in progress any more
        requests.put(None)  # then the other ranks stop too
        worker.join()
    collectives.shutdown()


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
