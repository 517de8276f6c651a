"""The chatglm.cpp peer, run with the Python of the venv that benchmarks/setup_peers.sh builds.

    PEER=~/.cache/chatglm2-bench/chatglm-cpp-venv/bin/python
    $PEER -m benchmarks.chatglm_cpp_worker convert --model_path CKPT --ggml_type q8_0 --out model-q8_0.bin
    $PEER -m benchmarks.chatglm_cpp_worker time --ggml model-q8_0.bin --prompt_len 128 --new_tokens 16

`convert` writes chatglm.cpp's GGML file from a checkpoint in the Hugging Face layout with chatglm-cpp's own converter
for the checkpoint's family (ChatGLM2Converter, ChatGLM3Converter or ChatGLM4Converter, the family told by the files
as load_tokenizer tells it), fed the checkpoint's tensors, config.json and tokenizer.model directly (its command-line
converter wants transformers' AutoModel with trust_remote_code, which a random-weight checkpoint has no code for).
`time` imports chatglm_cpp only (no torch, whose memory would count against the peer), then runs the same greedy loop
as chatglm.cpp's Pipeline: one generate_next_token over the prompt, then one per new token; prints one JSON line.
chatglm.cpp has no batched generation, so it is timed at batch 1 only. It takes its thread count from
std::thread::hardware_concurrency() (all cores up to 4, half of them above); run_suite.py sets that number through
the preloaded hardware_concurrency.c shim that setup_peers.sh builds.
"""
import argparse
import time
from pathlib import Path
from types import SimpleNamespace

from benchmarks.common import emit, peak_rss_bytes, prompt_ids, reset_peak_rss, rss_bytes, timing_summary

GGML_TYPES = ("f16", "q8_0", "q4_0")
WARMUP_NEW_TOKENS = 2
# Fields the converter reads that a checkpoint may omit (THUDM's defaults).
CONFIG_DEFAULTS = {"pre_seq_len": None, "rope_ratio": 1, "quantization_bit": None}


class SentencePieceModel:
    """The one method of sentencepiece.SentencePieceProcessor that the converter calls."""

    def __init__(self, proto: bytes):
        self.proto = proto

    def serialized_model_proto(self) -> bytes:
        return self.proto


def convert(model_path: Path, ggml_type: str, out: Path) -> None:
    from chatglm2.atomic import atomic_file
    from chatglm2.checkpoint import iter_tensors, read_config
    from chatglm2.tokenizer import load_tokenizer
    from chatglm_cpp.convert import ChatGLM2Converter, ChatGLM3Converter, ChatGLM4Converter, GGMLType

    config = {**CONFIG_DEFAULTS, **read_config(model_path)}
    ours = load_tokenizer(model_path)
    if ours.chat_family == "glm4":
        # The converter stores the tiktoken ranks file as it is; chatglm.cpp numbers GLM-4's special tokens after the
        # ranks itself. Its format holds one eos id, which its own convert() takes from the tokenizer (<|endoftext|>):
        # config.json's is a list.
        tokenizer = SimpleNamespace(vocab_file=model_path / "tokenizer.model")
        config["eos_token_id"] = ours.eos_token_id
    else:
        tokenizer = SimpleNamespace(tokenizer=SimpleNamespace(
            sp_model=SentencePieceModel((model_path / "tokenizer.model").read_bytes())))
    converter = {"chatglm2": ChatGLM2Converter, "chatglm3": ChatGLM3Converter, "glm4": ChatGLM4Converter}[
        ours.chat_family]
    state = {name: tensor for name, tensor in iter_tensors(model_path)}  # .bin shards stay memory-mapped
    model = SimpleNamespace(config=SimpleNamespace(**config), state_dict=lambda: state)
    start = time.perf_counter()
    with atomic_file(out) as tmp, open(tmp, "wb") as f:
        converter.convert(f, model, tokenizer, GGMLType[ggml_type.upper()])
    emit({"converted": str(out), "family": ours.chat_family, "ggml_type": ggml_type, "bytes": out.stat().st_size,
          "convert_s": time.perf_counter() - start})


def time_ggml(ggml: Path, prompt_len: int, new_tokens: int, repeats: int) -> None:
    import chatglm_cpp

    start = time.perf_counter()
    pipeline = chatglm_cpp.Pipeline(str(ggml), max_length=prompt_len + new_tokens)
    load = {"load_s": time.perf_counter() - start, "load_peak_rss": peak_rss_bytes(), "loaded_rss": rss_bytes()}
    model = pipeline.model
    ids = prompt_ids(prompt_len, model.config.vocab_size)
    gen_config = chatglm_cpp._C.GenerationConfig(max_length=prompt_len + new_tokens, max_new_tokens=new_tokens,
                                                  do_sample=False)

    def run(count: int) -> tuple[float, list[float]]:
        tokens = list(ids)
        stamps, n_past = [time.perf_counter()], 0
        for _ in range(count):
            next_id = model.generate_next_token(tokens, None, gen_config, n_past, len(ids))
            stamps.append(time.perf_counter())
            n_past = len(tokens)  # the cache now holds every token fed so far
            tokens.append(next_id)
        return stamps[1] - stamps[0], [later - earlier for earlier, later in zip(stamps[1:], stamps[2:])]

    peak_reset = reset_peak_rss()
    run(WARMUP_NEW_TOKENS)
    prefills, steps = [], []
    for _ in range(repeats):
        prefill_s, step_s = run(new_tokens)
        prefills.append(prefill_s)
        steps.append(step_s)
    emit({"engine": "chatglm.cpp", "version": chatglm_cpp.__version__,
          "runs": [timing_summary(1, prompt_len, prefills, steps)], **load, "run_peak_rss": peak_rss_bytes(),
          "run_peak_is_run_only": peak_reset, "ggml_bytes": ggml.stat().st_size})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to_ggml = commands.add_parser("convert")
    to_ggml.add_argument("--model_path", type=Path, required=True)
    to_ggml.add_argument("--ggml_type", choices=GGML_TYPES, required=True)
    to_ggml.add_argument("--out", type=Path, required=True)
    timing = commands.add_parser("time")
    timing.add_argument("--ggml", type=Path, required=True, help="a file written by `convert`")
    timing.add_argument("--prompt_len", type=int, default=128)
    timing.add_argument("--new_tokens", type=int, default=16)
    timing.add_argument("--repeats", type=int, default=3, help="timed generations")
    args = parser.parse_args()
    if args.command == "convert":
        convert(args.model_path, args.ggml_type, args.out)
    else:
        time_ggml(args.ggml, args.prompt_len, args.new_tokens, args.repeats)


if __name__ == "__main__":
    main()
