"""ChatGLM2's config.json: the fields this implementation reads, and the checkpoints it refuses."""
import json
from dataclasses import dataclass, field, fields

from chatglm2.errors import InputError

REQUIRED_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "kv_channels", "num_attention_heads",
                   "padded_vocab_size")
# What a field's JSON value must be, by its annotation: "num_layers": "4" or true is refused, not computed with.
JSON_TYPES = {
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    bool: ("true or false", lambda v: isinstance(v, bool)),
    list[int]: ("a list of integers", lambda v: isinstance(v, list) and all(JSON_TYPES[int][1](i) for i in v)),
}
JSON_TYPES[int | list[int]] = ("an integer or a list of integers",
                               lambda v: JSON_TYPES[int][1](v) or (JSON_TYPES[list[int]][1](v) and len(v) > 0))


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
    eos_token_id: int | list[int] = 2  # GLM-4 lists three: <|endoftext|>, <|user|>, <|observation|>
    pad_token_id: int = 0
    float_layers_id: list[int] = field(default_factory=lambda: [0])
    quantization_bit: int = 0  # THUDM's weight-only checkpoints (chatglm2-6b-int4): 4 or 8; 0 = float

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
        if config.get("quantization_bit") not in (None, 0, 4, 8):
            raise InputError(f"config.json sets quantization_bit to {json.dumps(config['quantization_bit'])}; THUDM's "
                             f"quantized checkpoints have 4 or 8 (0 or none for float); restore it from the original")
        known = {f.name for f in fields(cls)}
        values = {name: value for name, value in config.items() if name in known and value is not None}
        for f in fields(cls):
            what, valid = JSON_TYPES.get(f.type, ("", lambda v: True))
            if f.name in values and not valid(values[f.name]):
                raise InputError(f"config.json sets {f.name} to {json.dumps(values[f.name])}, not {what}; restore it "
                                 f"from the original checkpoint")
        small = [name for name in REQUIRED_FIELDS + ("multi_query_group_num",) if values.get(name, 1) < 1]
        if small:
            raise InputError(f"config.json sets {small[0]} to {values[small[0]]}; it must be at least 1")
        return cls(**values)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(self.eos_token_id) if isinstance(self.eos_token_id, list) else (self.eos_token_id,)

    @property
    def kv_groups(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    def rank_kv_groups(self, tp_size: int) -> int:
        """KV groups one tensor-parallel rank holds: its share, or one group replicated when ranks outnumber them."""
        return self.kv_groups // min(tp_size, self.kv_groups)
