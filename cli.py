"""What main.py and web_demo.py share: the model flags, one-line argument errors, and loading under torchrun."""
import argparse
import importlib.util
from pathlib import Path

import torch

import distributed
import fused_ops
from checkpoint import read_config
from errors import InputError
from tokenization_chatglm import ChatGLM2Tokenizer

DTYPES = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_MODEL_FILE = Path(__file__).resolve().parent / "modeling_chatglm_ascend.py"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (via InputError) instead of usage text plus a line."""

    def error(self, message: str) -> None:
        raise InputError(f"{message} (see {self.prog} --help)")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_path", required=True, help="checkpoint folder in the Hugging Face layout")
    parser.add_argument("--tp_size", type=int, default=1, help="tensor parallel size; equals torchrun --nproc_per_node")
    parser.add_argument("--device", type=int, default=0, help="first device id; rank r uses device id + r")
    parser.add_argument("--model_file", default=str(DEFAULT_MODEL_FILE),
                        help="modeling file providing ChatGLM2ForCausalLM (default: modeling_chatglm_ascend.py)")
    parser.add_argument("--backend", default="auto", choices=fused_ops.DEVICE_KINDS,
                        help="device kind; auto picks NPU, else CUDA, else CPU")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights and activations; auto = fp16 on NPU/GPU, bf16 on CPU where supported")


def _model_class(model_file: str) -> type:
    path = Path(model_file)
    if not path.is_file():
        raise InputError(f"--model_file {model_file} does not exist; leave it out to use modeling_chatglm_ascend.py")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "ChatGLM2ForCausalLM"):
        raise InputError(f"--model_file {model_file} defines no ChatGLM2ForCausalLM")
    return module.ChatGLM2ForCausalLM


def load_model_and_tokenizer(args: argparse.Namespace):
    """Join the torchrun group (if any), then load this rank's model on device --device + rank."""
    fused_ops.set_cpu_threads()
    distributed.check_tp_size(args.tp_size)
    device = fused_ops.select_device(args.backend, args.device + distributed.launched_rank())
    tp_rank = distributed.init_tensor_parallel(args.tp_size, device)
    read_config(args.model_path)
    tokenizer = ChatGLM2Tokenizer.from_pretrained(args.model_path)
    model = _model_class(args.model_file).from_pretrained(
        args.model_path, device=device, dtype=DTYPES[args.dtype], tp_rank=tp_rank, tp_size=args.tp_size,
        show_progress=tp_rank == 0)
    if tp_rank == 0:
        print(f"loaded {args.model_path} on {device} ({str(model.dtype).removeprefix('torch.')}, tp_size {args.tp_size}, "
              f"MAX_SEQ_LEN {model.max_seq_len})", flush=True)
    return model, tokenizer
