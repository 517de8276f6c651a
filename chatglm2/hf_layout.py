"""transformers' native layout of the same models (`GlmForCausalLM`, THUDM's `-hf` repositories), read as THUDM's.

Its config.json has transformers' field names and its q, k, v projections are separate tensors; both are mapped onto
ChatGLMModel's names here, so every command reads either layout and everything it writes is in THUDM's.
"""
import re

from chatglm2.errors import InputError

EMBEDDING = "model.embed_tokens.weight"
RENAMED = {"model.embed_tokens.weight": "transformer.embedding.word_embeddings.weight",
           "model.norm.weight": "transformer.encoder.final_layernorm.weight",
           "lm_head.weight": "transformer.output_layer.weight"}
LAYER_RENAMED = {"input_layernorm.weight": "input_layernorm.weight",
                 "post_attention_layernorm.weight": "post_attention_layernorm.weight",
                 "self_attn.o_proj.weight": "self_attention.dense.weight",
                 "mlp.gate_up_proj.weight": "mlp.dense_h_to_4h.weight",
                 "mlp.down_proj.weight": "mlp.dense_4h_to_h.weight"}
QKV = re.compile(r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def is_hf_config(config: dict) -> bool:
    return config.get("model_type") == "glm" or "GlmForCausalLM" in (config.get("architectures") or [])


def chatglm_config(config: dict) -> dict:
    """THUDM's config.json fields for a GlmForCausalLM config.json (transformers 4.46+ or 5: rope settings at the top
    or in rope_parameters)."""
    rope = dict(config, **(config.get("rope_parameters") or {}))
    if rope.get("partial_rotary_factor", 0.5) != 0.5 or config.get("hidden_act", "silu") != "silu" or \
            config.get("tie_word_embeddings"):
        raise InputError("config.json describes a GlmForCausalLM that differs from ChatGLM's architecture "
                         "(partial_rotary_factor 0.5, silu, untied embeddings); this checkpoint is another model")
    fields = {"num_hidden_layers": "num_layers", "hidden_size": "hidden_size", "intermediate_size": "ffn_hidden_size",
              "head_dim": "kv_channels", "num_attention_heads": "num_attention_heads",
              "num_key_value_heads": "multi_query_group_num", "vocab_size": "padded_vocab_size",
              "max_position_embeddings": "seq_length", "rms_norm_eps": "layernorm_epsilon",
              "attention_bias": "add_qkv_bias", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id"}
    translated = {ours: config[theirs] for theirs, ours in fields.items() if config.get(theirs) is not None}
    if "kv_channels" not in translated and isinstance(config.get("num_attention_heads"), int) and \
            isinstance(config.get("hidden_size"), int):
        translated["kv_channels"] = config["hidden_size"] // config["num_attention_heads"]
    if isinstance(rope.get("rope_theta"), (int, float)):
        translated["rope_ratio"] = rope["rope_theta"] / 10000.0
    return {**translated, "multi_query_attention": True,
            **{k: config[k] for k in ("float_layers_id", "world_size", "tp_rank", "source_fingerprint") if k in config}}


def tensor_sources(names: list[str]) -> dict[str, list[str]]:
    """THUDM's tensor name -> the stored names it is made of (q, k, v concatenated for query_key_value); names of
    neither layout pass through, so the loader names them."""
    sources: dict[str, list[str]] = {}
    for name in names:
        qkv, layer = QKV.fullmatch(name), LAYER.fullmatch(name)
        if qkv:
            n, _, kind = qkv.groups()
            target = f"transformer.encoder.layers.{n}.self_attention.query_key_value.{kind}"
            sources[target] = [f"model.layers.{n}.self_attn.{p}_proj.{kind}" for p in "qkv"]
        elif layer and layer.group(2) in LAYER_RENAMED:
            sources[f"transformer.encoder.layers.{layer.group(1)}.{LAYER_RENAMED[layer.group(2)]}"] = [name]
        else:
            sources[RENAMED.get(name, name)] = [name]
    stored = set(names)
    for target, parts in sources.items():
        missing = [part for part in parts if part not in stored]
        if missing:
            raise InputError(f"the checkpoint lacks {missing[0]} (needed with the other projections for {target}); "
                             f"it is incomplete")
    return sources
