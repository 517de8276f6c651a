"""What the commands share: one-line errors and exit codes, the model flags, and loading under torchrun."""
import argparse
import importlib
import importlib.util
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from chatglm2 import collectives, settings
from chatglm2.checkpoint import read_config
from chatglm2.compiled import COMPILE_MODES
from chatglm2.device import DEVICE_KINDS, select_device, set_cpu_threads
from chatglm2.engine import Engine
from chatglm2.errors import InputError
from chatglm2.kv_pool import full_length_tokens
from chatglm2.memory import DEFAULT_KV_CACHE_MEMORY, kv_cache_tokens_in
from chatglm2.tokenizer import ChatGLM2Tokenizer, load_tokenizer
from chatglm2.weight_only import DEFAULT_GROUP_SIZE, QUANTIZE_CHOICES, describe
from chatglm2.weight_only_linear import GROUP_SIZES

DTYPES = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_MODEL_FILE = "modeling_chatglm_ascend.py"
SEED_MODEL_FILE = Path(__file__).resolve().parent.parent / DEFAULT_MODEL_FILE


def run_cli(main: Callable[[], None]) -> None:
    """Run a command's main(); bad input becomes one 'error: ...' line on stderr and exit status 2.

    Under torchrun every rank exits with 2 but only rank 0 prints, so the user reads the message once.
    """
    try:
        main()
    except InputError as error:
        collectives.exit_on_error(f"error: {error}", 2)
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
    parser.add_argument("--compile", default="auto", choices=COMPILE_MODES,
                        help="the decode step compiled by inductor and, on CUDA, captured in CUDA graphs; "
                             "auto = on for CUDA, off elsewhere")
    parser.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES,
                        help="weight-only quantization at load of the four linears of every layer (a THUDM int4/int8 "
                             "checkpoint needs no flag)")
    parser.add_argument("--group_size", type=int, default=DEFAULT_GROUP_SIZE, choices=GROUP_SIZES,
                        help=f"int4: input columns per scale and zero point (default {DEFAULT_GROUP_SIZE})")
    parser.add_argument("--quantize_output_layer", default="auto", choices=("auto",) + QUANTIZE_CHOICES + ("none",),
                        help="output_layer of a weight-only model: auto (as the other layers, the fastest; float for "
                             "THUDM's checkpoints, as stored), int8 (more accurate under int4), int4, or none (float)")
    parser.add_argument("--quantize_attention", default="auto", choices=("auto",) + QUANTIZE_CHOICES,
                        help="query_key_value and self_attention.dense under --quantize: auto (as the other layers) or "
                             "int8 (more accurate under int4, more bytes)")
    parser.add_argument("--quantize_activations", default="none", choices=("none", "int8"),
                        help="int8: int8 layers round each activation row to 8 bits at run time (fbgemm's integer "
                             "GEMM on x86 CPUs: faster, a little less accurate)")


def model_class(model_file: str) -> type:
    """ChatGLM2ForCausalLM of the seed's modeling file (imported by name, so it is loaded once) or of a custom one."""
    if model_file == DEFAULT_MODEL_FILE or Path(model_file).resolve() == SEED_MODEL_FILE:
        return importlib.import_module("modeling_chatglm_ascend").ChatGLM2ForCausalLM
    path = Path(model_file)
    if not path.is_file():
        raise InputError(f"--model_file {model_file} does not exist; leave it out to use {DEFAULT_MODEL_FILE}")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None:
        raise InputError(f"--model_file {model_file} is not a Python file (*.py); name the modeling file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # the user's own code: say where to look rather than print our traceback
        raise InputError(f"--model_file {model_file} fails to import ({error.__class__.__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}); run python {model_file} to see the "
                         f"traceback") from None
    if not hasattr(module, "ChatGLM2ForCausalLM"):
        raise InputError(f"--model_file {model_file} defines no ChatGLM2ForCausalLM")
    return module.ChatGLM2ForCausalLM


@dataclass
class Checkpoint:
    """What the checks before loading need: this rank's device and tensor-parallel rank, and the checkpoint's
    tokenizer (config.json read first)."""
    device: torch.device
    tp_rank: int
    tokenizer: ChatGLM2Tokenizer


def open_checkpoint(args: argparse.Namespace) -> Checkpoint:
    """Join the torchrun group (if any) on device --device + rank; read config.json and the tokenizer, not weights."""
    set_cpu_threads()
    collectives.check_tp_size(args.tp_size)
    device = select_device(args.backend, args.device + collectives.launched_rank())
    tp_rank = collectives.init_tensor_parallel(args.tp_size, device, settings.tp_timeout_s())
    read_config(args.model_path)
    return Checkpoint(device, tp_rank, load_tokenizer(args.model_path))


def load_model(args: argparse.Namespace, checkpoint: Checkpoint, kv_cache_tokens: int):
    """This rank's model, for a KV cache of kv_cache_tokens tokens: the weights and that cache are checked against
    the free memory together before any weight is read."""
    tp_rank = checkpoint.tp_rank
    model = model_class(args.model_file).from_pretrained(
        args.model_path, device=checkpoint.device, dtype=DTYPES[args.dtype], tp_rank=tp_rank, tp_size=args.tp_size,
        show_progress=tp_rank == 0, compile=args.compile, quantize=args.quantize, group_size=args.group_size,
        quantize_output_layer=None if args.quantize_output_layer == "none" else args.quantize_output_layer,
        quantize_attention=args.quantize_attention,
        quantize_activations=None if args.quantize_activations == "none" else args.quantize_activations,
        kv_cache_tokens=kv_cache_tokens)
    if tp_rank == 0:
        print(f"loaded {args.model_path} on {checkpoint.device} ({str(model.dtype).removeprefix('torch.')}"
              f"{describe(model)}, tp_size {args.tp_size}, MAX_SEQ_LEN {model.max_seq_len})", flush=True)
    return model


def port_number(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1 to 65535)")
    return int(text)


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in (0, 1]")
    return value


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def add_server_args(parser: argparse.ArgumentParser, default_port: int, default_max_batch: int) -> None:
    """The flags web_demo.py and openai_api.py share."""
    parser.add_argument("--server_name", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 opens the server to the network")
    parser.add_argument("--server_port", type=port_number, default=default_port)
    parser.add_argument("--max_batch", type=positive_int, default=default_max_batch,
                        help=f"requests answered at once (default {default_max_batch}): the rows of a decode step")
    parser.add_argument("--kv_cache_tokens", type=positive_int, default=None,
                        help="the KV cache pool in tokens, shared by the requests as they grow (default: env "
                             "KV_CACHE_TOKENS; else on a GPU or NPU what --kv_cache_memory gives, on a CPU max_batch x "
                             "MAX_SEQ_LEN, room for every request at full length); 28 KiB per token for ChatGLM2-6B "
                             "in fp16")
    parser.add_argument("--kv_cache_memory", type=fraction, default=None,
                        help=f"size the pool as this fraction of the memory free once the weights are loaded (default "
                             f"{DEFAULT_KV_CACHE_MEMORY} on a GPU or NPU, as vLLM's gpu_memory_utilization; on a CPU "
                             f"only when given; --kv_cache_tokens wins)")
    parser.add_argument("--no_prefix_caching", action="store_true",
                        help="prefill every prompt whole, rather than reusing the cached blocks of a prefix seen "
                             "before (an earlier turn of the conversation, a shared system prompt)")
    parser.add_argument("--max_prefill_tokens", type=positive_int, default=None,
                        help="prompt tokens one prefill takes at most (default: whole prompts); longer prompts go in "
                             "chunks, taking turns with the decode steps of the answers already streaming, so a long "
                             "prompt delays them by one chunk's time at most (e.g. 512 on a CPU)")


def check_port_free(host: str, port: int) -> None:
    """Fail before the model loads (minutes for the real one) rather than after."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: a port in TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError as error:
            raise InputError(f"cannot listen on {host}:{port} ({error.strerror}); "
                             f"pick a free port with --server_port") from None


def kv_cache_plan(args: argparse.Namespace, device: torch.device) -> tuple[int | None, float | None]:
    """The servers' pool: (tokens, None) for --kv_cache_tokens, KV_CACHE_TOKENS, or on a CPU max_batch full-length
    sequences; (None, fraction) for one sized by --kv_cache_memory (by default on a GPU or NPU) once loaded."""
    tokens = args.kv_cache_tokens or settings.kv_cache_tokens()
    if tokens:
        return tokens, None
    if args.kv_cache_memory or device.type != "cpu":
        return None, args.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY
    return full_length_tokens(args.max_batch, settings.max_seq_len()), None


def memory_sized_kv_cache(model, fraction: float, tp_size: int) -> int:
    """The KV cache that `fraction` of the free memory holds on every rank (rank 0 hands out blocks that every rank
    must have); refused when it is less than one sequence of MAX_SEQ_LEN."""
    tokens = -int(collectives.all_ranks_max(-kv_cache_tokens_in(fraction, model.config, tp_size, model.dtype,
                                                                 model.device)))
    if tokens < model.max_seq_len:
        raise InputError(f"--kv_cache_memory {fraction} of the free memory holds a KV cache of {tokens} tokens, less "
                         f"than one sequence of MAX_SEQ_LEN={model.max_seq_len}; raise it, lower MAX_SEQ_LEN or give "
                         f"--kv_cache_tokens")
    return tokens


def ignore_stop_signals() -> None:
    """Under torchrun the other ranks leave when rank 0 says so, never mid-collective."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def serve(args: argparse.Namespace, run_server: Callable[[Engine, ChatGLM2Tokenizer], None],
          max_waiting: int | None = None) -> None:
    """The life of a server command (web_demo.py, openai_api.py): the port, then the memory for the weights and the
    KV cache (--kv_cache_tokens), checked before the model loads; then an engine of --max_batch rows. Rank 0 runs
    run_server(engine, tokenizer) while the engine's thread answers; the other ranks follow the engine's plan; when
    run_server returns, everything stops together."""
    rank0 = collectives.launched_rank() == 0
    if rank0:
        check_port_free(args.server_name, args.server_port)
    checkpoint = open_checkpoint(args)
    kv_cache_tokens, memory_fraction = kv_cache_plan(args, checkpoint.device)
    # a pool sized by the memory left after the weights needs room for one sequence at least
    model = load_model(args, checkpoint, kv_cache_tokens or full_length_tokens(1, settings.max_seq_len()))
    if kv_cache_tokens is None:
        kv_cache_tokens = memory_sized_kv_cache(model, memory_fraction, args.tp_size)
    engine = Engine(model, args.max_batch, checkpoint.tokenizer, max_waiting, args.max_prefill_tokens,
                    kv_cache_tokens, prefix_caching=not args.no_prefix_caching)
    if rank0:
        print(model.kv_cache_summary(), flush=True)
    if not rank0:
        # Ctrl+C and torchrun's SIGTERM reach every rank; these leave when rank 0 says so, never mid-collective.
        ignore_stop_signals()
        engine.follow_forever()
        collectives.shutdown()
        return
    stopping = threading.Event()
    worker = threading.Thread(target=engine.serve_forever, args=(stopping,), name="engine")
    worker.start()
    try:
        run_server(engine, checkpoint.tokenizer)
    finally:
        ignore_stop_signals()  # the terminal's and torchrun's signals come in pairs: let the second not cut this short
        stopping.set()  # ends the answers in progress; then the other ranks stop too
        engine.wake()
        worker.join()
    collectives.shutdown()
