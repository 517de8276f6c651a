"""The independent implementation for parity tests: transformers' GlmForCausalLM loaded with a ChatGLM2 checkpoint."""
import json
from pathlib import Path

from transformers import GlmConfig, GlmForCausalLM

from chatglm2.checkpoint import iter_tensors


def glm_reference(path: str | Path) -> GlmForCausalLM:
    """GLM-4's architecture in transformers computes ChatGLM2 once the fused QKV and gate/up weights are split."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    heads, groups, head_dim = cfg["num_attention_heads"], cfg["multi_query_group_num"], cfg["kv_channels"]
    config = GlmConfig(
        vocab_size=cfg["padded_vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["ffn_hidden_size"],
        num_hidden_layers=cfg["num_layers"], num_attention_heads=heads, num_key_value_heads=groups, head_dim=head_dim,
        rms_norm_eps=cfg["layernorm_epsilon"], attention_bias=True, tie_word_embeddings=False,
        max_position_embeddings=cfg["seq_length"], pad_token_id=cfg.get("pad_token_id", 0),
        eos_token_id=cfg.get("eos_token_id", 2), bos_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * cfg.get("rope_ratio", 1.0),
                         "partial_rotary_factor": 0.5},
        attn_implementation="eager")
    model = GlmForCausalLM(config).float().eval()
    q_size, kv_size = heads * head_dim, groups * head_dim
    state = {}
    for name, tensor in iter_tensors(path):
        tensor = tensor.float()
        if name == "transformer.embedding.word_embeddings.weight":
            state["model.embed_tokens.weight"] = tensor
        elif name == "transformer.encoder.final_layernorm.weight":
            state["model.norm.weight"] = tensor
        elif name == "transformer.output_layer.weight":
            state["lm_head.weight"] = tensor
        elif name.startswith("transformer.encoder.layers."):
            n, rest = name.removeprefix("transformer.encoder.layers.").split(".", 1)
            prefix = f"model.layers.{n}."
            if rest.startswith("self_attention.query_key_value."):
                kind = rest.rsplit(".", 1)[1]
                q, k, v = tensor.split([q_size, kv_size, kv_size], dim=0)
                for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    state[f"{prefix}self_attn.{proj}.{kind}"] = part
            else:
                renamed = {"self_attention.dense.weight": "self_attn.o_proj.weight",
                           "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
                           "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight"}.get(rest, rest)
                state[prefix + renamed] = tensor
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    return model
