"""Random-weight checkpoints of the GLM family in the exact Hugging Face layout, for the demo, the tests and the
benchmarks: ChatGLM2-6B's, ChatGLM3-6B's or GLM-4-9B-chat's files with small or full-width shapes.

ChatGLM2's and ChatGLM3's tokenizer.model is a SentencePiece model trained on assets/tokenizer_corpus.txt; GLM-4's
holds BPE ranks learned from the same text, padded to the real vocabulary's 151,329 ranks (glm4_vocab.py), so its
special token ids are the published ones.
"""
import json
import math
import tempfile
from pathlib import Path
from typing import Iterator

import sentencepiece
import torch

from chatglm2.checkpoint import check_replaceable, write_checkpoint
from chatglm2.errors import InputError
from chatglm2.glm4_vocab import write_glm4_tokenizer
from chatglm2.tokenizer import load_tokenizer

CORPUS = Path(__file__).resolve().parent.parent / "assets" / "tokenizer_corpus.txt"
# What each model's config.json sets beyond the shape (THUDM's chatglm2-6b, chatglm3-6b and glm-4-9b-chat); the
# full-width vocabulary is padded_vocab_size.
FAMILIES = {
    "chatglm2": dict(_name_or_path="THUDM/chatglm2-6b", seq_length=32768, padded_vocab_size=65024),
    "chatglm3": dict(_name_or_path="THUDM/chatglm3-6b", seq_length=8192, padded_vocab_size=65024),
    "glm4": dict(_name_or_path="THUDM/glm-4-9b-chat", seq_length=131072, rope_ratio=500, layernorm_epsilon=1.5625e-07,
                 eos_token_id=[151329, 151336, 151338], pad_token_id=151329, padded_vocab_size=151552),
}


def full_width(family: str = "chatglm2") -> dict:
    """The real models' width (GLM-4-9B's differs from ChatGLM2-6B's in layers and vocabulary only)."""
    return dict(hidden_size=4096, ffn_hidden_size=13696, num_attention_heads=32, kv_channels=128,
                padded_vocab_size=FAMILIES[family]["padded_vocab_size"])


FULL_WIDTH = full_width()


def train_tokenizer(directory: Path, vocab_size: int = 2000, family: str = "chatglm2") -> None:
    """Train tokenizer.model with ChatGLM2's conventions: unk=pad=0, bos=1, eos=2, byte fallback, split digits (for
    GLM-4, its BPE ranks)."""
    if family == "glm4":
        write_glm4_tokenizer(directory, CORPUS)
        return
    sentencepiece.SentencePieceTrainer.train(
        input=str(CORPUS), model_prefix=str(directory / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        character_coverage=0.9995, byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        hard_vocab_limit=False, minloglevel=2, num_threads=2)
    tokenizer_config = {"name_or_path": FAMILIES[family]["_name_or_path"], "remove_space": False, "do_lower_case": False,
                        "tokenizer_class": "ChatGLMTokenizer", "padding_side": "left"}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config) + "\n", encoding="utf-8")


def demo_config(num_layers: int = 2, hidden_size: int = 64, ffn_hidden_size: int = 160, num_attention_heads: int = 8,
                kv_channels: int | None = None, multi_query_group_num: int = 2, padded_vocab_size: int = 2112,
                family: str = "chatglm2") -> dict:
    """config.json in THUDM's form (with the seed's world_size and float_layers_id additions)."""
    config = {
        "architectures": ["ChatGLMModel"], "model_type": "chatglm", "add_bias_linear": False, "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True, "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0, "attention_softmax_in_fp32": True, "bias_dropout_fusion": True,
        "ffn_hidden_size": ffn_hidden_size, "fp32_residual_connection": False, "hidden_dropout": 0.0,
        "hidden_size": hidden_size, "kv_channels": kv_channels or hidden_size // num_attention_heads,
        "layernorm_epsilon": 1e-05, "multi_query_attention": True, "multi_query_group_num": multi_query_group_num,
        "num_attention_heads": num_attention_heads, "num_layers": num_layers, "original_rope": True,
        "padded_vocab_size": padded_vocab_size, "post_layer_norm": True, "rmsnorm": True,
        "use_cache": True, "torch_dtype": "float16", "transformers_version": "4.27.1", "tie_word_embeddings": False,
        "eos_token_id": 2, "pad_token_id": 0, "world_size": 1, "float_layers_id": [0],
    }
    config.update({name: value for name, value in FAMILIES[family].items() if name != "padded_vocab_size"})
    return config


def random_shards(config: dict, num_shards: int, dtype: torch.dtype, seed: int,
                  device: str = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    """The state dict of THUDM/chatglm2-6b's layout with random values, layers spread over `num_shards` shards."""
    generator = torch.Generator(device).manual_seed(seed)  # a GPU draws the 6B shape in seconds
    hidden, ffn, layers = config["hidden_size"], config["ffn_hidden_size"], config["num_layers"]
    qkv_rows = (config["num_attention_heads"] + 2 * config["multi_query_group_num"]) * config["kv_channels"]
    std = 0.02

    def normal(*shape: int, scale: float = std) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator, device=device) * scale).to("cpu", dtype)

    def norm_weight() -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(hidden, generator=generator, device=device)).to("cpu", dtype)

    layers_per_shard = math.ceil(layers / num_shards)
    for k in range(num_shards):
        shard = {}
        if k == 0:
            shard["transformer.embedding.word_embeddings.weight"] = normal(config["padded_vocab_size"], hidden, scale=1.0)
        for n in range(k * layers_per_shard, min(layers, (k + 1) * layers_per_shard)):
            prefix = f"transformer.encoder.layers.{n}."
            shard[prefix + "input_layernorm.weight"] = norm_weight()
            shard[prefix + "self_attention.query_key_value.weight"] = normal(qkv_rows, hidden)
            shard[prefix + "self_attention.query_key_value.bias"] = normal(qkv_rows, scale=0.1)
            shard[prefix + "self_attention.dense.weight"] = normal(hidden, config["num_attention_heads"] * config["kv_channels"])
            shard[prefix + "post_attention_layernorm.weight"] = norm_weight()
            shard[prefix + "mlp.dense_h_to_4h.weight"] = normal(2 * ffn, hidden)
            shard[prefix + "mlp.dense_4h_to_h.weight"] = normal(hidden, ffn)
        if k == num_shards - 1:
            shard["transformer.encoder.final_layernorm.weight"] = norm_weight()
            shard["transformer.output_layer.weight"] = normal(config["padded_vocab_size"], hidden)
            inv_freq = 1.0 / (10000 ** (torch.arange(0, config["kv_channels"] // 2, 2).float() / (config["kv_channels"] // 2)))
            shard["transformer.rotary_pos_emb.inv_freq"] = inv_freq.to(dtype)
        yield shard


def write_demo_checkpoint(path: str | Path, num_layers: int = 2, hidden_size: int = 64, ffn_hidden_size: int = 160,
                          num_attention_heads: int = 8, kv_channels: int | None = None, multi_query_group_num: int = 2,
                          padded_vocab_size: int | None = None, num_shards: int = 2, safetensors: bool = False,
                          dtype: torch.dtype = torch.float16, seed: int = 0, vocab_size: int = 2000,
                          device: str = "cpu", family: str = "chatglm2") -> Path:
    """Write the checkpoint folder (new, empty, or one written so before: see check_replaceable) and return its path;
    padded_vocab_size defaults to the tokenizer's, rounded up to 64 (GLM-4's: the real 151,552)."""
    if family not in FAMILIES:
        raise InputError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    if num_shards < 1 or num_shards > num_layers + 1:
        raise InputError(f"--num_shards must be between 1 and num_layers + 1 ({num_layers + 1}), got {num_shards}")
    check_replaceable(Path(path))  # before the tokenizer's training, not after
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        train_tokenizer(Path(tokenizer_dir), vocab_size, family)
        tokens = load_tokenizer(tokenizer_dir).vocab_size
        default = FAMILIES[family]["padded_vocab_size"] if family == "glm4" else 64 * math.ceil(tokens / 64)
        padded_vocab_size = padded_vocab_size or default
        if padded_vocab_size < tokens:
            raise InputError(f"padded_vocab_size {padded_vocab_size} is smaller than the tokenizer's {tokens} tokens")
        config = demo_config(num_layers, hidden_size, ffn_hidden_size, num_attention_heads, kv_channels,
                             multi_query_group_num, padded_vocab_size, family)
        write_checkpoint(path, config, random_shards(config, num_shards, dtype, seed, device), num_shards, tokenizer_dir,
                         safetensors)
    return Path(path)
