"""ChatGLM2's config.json: the fields this implementation reads, and the checkpoints it refuses."""
from dataclasses import dataclass, field, fields

from chatglm2.errors import InputError

REQUIRED_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "kv_channels", "num_attention_heads",
                   "padded_vocab_size")


@dataclass
class ChatGLM2Config:
    num_layers: int = 28
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    kv_channels: int = 128
    num_attention_heads: int = 32
    multi_query_attention: bool = True
    multi_query_group_num: int = 2
    padded_vocab_size: int = 65024
    seq_length: int = 32768
    layernorm_epsilon: float = 1e-5
    add_qkv_bias: bool = True
    rope_ratio: float = 1.0
    eos_token_id: int = 2
    pad_token_id: int = 0
    float_layers_id: list[int] = field(default_factory=lambda: [0])

    @classmethod
    def from_dict(cls, config: dict) -> "ChatGLM2Config":
        """Known fields are read, unknown ones (world_size, auto_map, ...) ignored; other architectures refused."""
        missing = [name for name in REQUIRED_FIELDS if name not in config]
        if missing:
            raise InputError(f"config.json lacks {', '.join(missing)}; is this a ChatGLM2 checkpoint?")
        unsupported = {"rmsnorm": False, "post_layer_norm": False, "add_bias_linear": True,
                       "apply_residual_connection_post_layernorm": True, "original_rope": False}
        for name, bad in unsupported.items():
            if config.get(name, not bad) == bad:
                raise InputError(f"config.json sets {name}={bad}, which ChatGLM2 does not use; this checkpoint is another model")
        if config.get("pre_seq_len"):
            raise InputError("config.json sets pre_seq_len (a P-tuning v2 prefix), which is not supported; "
                             "merge or drop the prefix encoder first")
        if config.get("quantization_bit"):
            raise InputError("config.json sets quantization_bit (THUDM's own int4/int8 format), which is not supported; "
                             "use the float checkpoint, and ENABLE_QUANT for W8A8")
        known = {f.name for f in fields(cls)}
        values = {name: value for name, value in config.items() if name in known and value is not None}
        return cls(**values)

    @property
    def kv_groups(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads
