"""What the commands share: one-line errors and exit codes, the model flags, and loading under torchrun."""
import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from chatglm2 import collectives, settings
from chatglm2.checkpoint import read_config
from chatglm2.device import DEVICE_KINDS, select_device, set_cpu_threads
from chatglm2.errors import InputError
from chatglm2.tokenizer import ChatGLM2Tokenizer

DTYPES = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_MODEL_FILE = "modeling_chatglm_ascend.py"
SEED_MODEL_FILE = Path(__file__).resolve().parent.parent / DEFAULT_MODEL_FILE


def run_cli(main: Callable[[], None]) -> None:
    """Run a command's main(); bad input becomes one 'error: ...' line on stderr and exit status 2.

    Under torchrun every rank exits non-zero but only rank 0 prints, so the user reads the message once.
    """
    try:
        main()
    except InputError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (via InputError) instead of usage text plus a line."""

    def error(self, message: str) -> None:
        raise InputError(f"{message} (see {self.prog} --help)")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_path", required=True, help="checkpoint folder in the Hugging Face layout")
    parser.add_argument("--tp_size", type=int, default=1, help="tensor parallel size; equals torchrun --nproc_per_node")
    parser.add_argument("--device", type=int, default=0, help="first device id; rank r uses device id + r")
    parser.add_argument("--model_file", default=DEFAULT_MODEL_FILE,
                        help="modeling file providing ChatGLM2ForCausalLM (default: modeling_chatglm_ascend.py)")
    parser.add_argument("--backend", default="auto", choices=DEVICE_KINDS,
                        help="device kind; auto picks NPU, else CUDA, else CPU")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights and activations; auto = fp16 on NPU/GPU, bf16 on CPU where supported")


def model_class(model_file: str) -> type:
    """ChatGLM2ForCausalLM of the seed's modeling file (imported by name, so it is loaded once) or of a custom one."""
    if model_file == DEFAULT_MODEL_FILE or Path(model_file).resolve() == SEED_MODEL_FILE:
        return importlib.import_module("modeling_chatglm_ascend").ChatGLM2ForCausalLM
    path = Path(model_file)
    if not path.is_file():
        raise InputError(f"--model_file {model_file} does not exist; leave it out to use {DEFAULT_MODEL_FILE}")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "ChatGLM2ForCausalLM"):
        raise InputError(f"--model_file {model_file} defines no ChatGLM2ForCausalLM")
    return module.ChatGLM2ForCausalLM


def load_model_and_tokenizer(args: argparse.Namespace):
    """Join the torchrun group (if any), then load this rank's model on device --device + rank."""
    set_cpu_threads()
    collectives.check_tp_size(args.tp_size)
    device = select_device(args.backend, args.device + collectives.launched_rank())
    tp_rank = collectives.init_tensor_parallel(args.tp_size, device, settings.tp_timeout_s())
    read_config(args.model_path)
    tokenizer = ChatGLM2Tokenizer.from_pretrained(args.model_path)
    model = model_class(args.model_file).from_pretrained(
        args.model_path, device=device, dtype=DTYPES[args.dtype], tp_rank=tp_rank, tp_size=args.tp_size,
        show_progress=tp_rank == 0)
    if tp_rank == 0:
        print(f"loaded {args.model_path} on {device} ({str(model.dtype).removeprefix('torch.')}, tp_size {args.tp_size}, "
              f"MAX_SEQ_LEN {model.max_seq_len})", flush=True)
    return model, tokenizer
