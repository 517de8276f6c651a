"""ChatGLM2-6B for inference on Ascend NPU, NVIDIA GPU or CPU: the model, its loading, and generation.

The module layout and parameter names mirror THUDM/chatglm2-6b, so a Hugging Face checkpoint (or a tensor-parallel
part written by process_weights.py) loads by name. The heavy operators come from ops.py.
"""
import random
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from chatglm2 import collectives, ops, sampling, settings
from chatglm2.config import ChatGLM2Config
from chatglm2.errors import InputError
from chatglm2.loading import load_pretrained
from chatglm2.ops import RMSNorm
from chatglm2.tokenizer import ChatGLM2Tokenizer


class SelfAttention(nn.Module):
    """Multi-query attention; under tensor parallel this rank holds heads/tp query heads and its KV group."""

    def __init__(self, config: ChatGLM2Config, tp_size: int):
        super().__init__()
        self.num_heads = config.num_attention_heads // tp_size
        self.num_kv_groups = config.kv_groups // min(tp_size, config.kv_groups)
        self.head_dim = config.kv_channels
        self.tp_size = tp_size
        qkv_size = (self.num_heads + 2 * self.num_kv_groups) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, qkv_size, bias=config.add_qkv_bias)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                kv_cache: torch.Tensor | None, start: int) -> torch.Tensor:
        batch, seq, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_groups * self.head_dim
        q, k, v = self.query_key_value(x).split([q_size, kv_size, kv_size], dim=-1)
        q = ops.apply_rotary(q.view(batch, seq, self.num_heads, self.head_dim), cos, sin)
        k = ops.apply_rotary(k.view(batch, seq, self.num_kv_groups, self.head_dim), cos, sin).transpose(1, 2)
        v = v.view(batch, seq, self.num_kv_groups, self.head_dim).transpose(1, 2)
        if kv_cache is not None:
            kv_cache[0, :, :, start:start + seq] = k
            kv_cache[1, :, :, start:start + seq] = v
            k, v = kv_cache[0, :, :, :start + seq], kv_cache[1, :, :, :start + seq]
        out = self.dense(ops.attention(q, k, v, mask))
        return collectives.all_reduce_sum(out) if self.tp_size > 1 else out


class MLP(nn.Module):
    """SwiGLU; dense_h_to_4h holds this rank's gate rows then its up rows, so the split stays local under TP."""

    def __init__(self, config: ChatGLM2Config, tp_size: int):
        super().__init__()
        ffn_size = config.ffn_hidden_size // tp_size
        self.tp_size = tp_size
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * ffn_size, bias=False)
        self.dense_4h_to_h = nn.Linear(ffn_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dense_4h_to_h(ops.swiglu(self.dense_h_to_4h(x)))
        return collectives.all_reduce_sum(out) if self.tp_size > 1 else out


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLM2Config, tp_size: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config, tp_size)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config, tp_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                kv_cache: torch.Tensor | None, start: int) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), cos, sin, mask, kv_cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Embedding(nn.Module):
    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)


class Encoder(nn.Module):
    def __init__(self, config: ChatGLM2Config, tp_size: int):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config, tp_size) for _ in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)


class ChatGLM2Model(nn.Module):
    def __init__(self, config: ChatGLM2Config, tp_size: int):
        super().__init__()
        self.embedding = Embedding(config)
        self.encoder = Encoder(config, tp_size)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size // tp_size, bias=False)


def attention_mask(key_valid: torch.Tensor, has_padding: bool, start: int, seq: int) -> torch.Tensor | None:
    """Bool [batch, 1, seq, start+seq] (True = may attend), or None when plain causal attention is exact.

    A padding query row may attend to itself only, so that it never sees an all-masked row (NaN).
    """
    keys = start + seq
    if not has_padding:
        return None
    positions = torch.arange(keys, device=key_valid.device)
    query_positions = positions[start:, None]
    causal = positions[None, :] <= query_positions
    mask = causal[None, None] & key_valid[:, None, None, :keys]
    return mask | (positions[None, :] == query_positions)[None, None]


class ChatGLM2ForCausalLM(nn.Module):
    def __init__(self, config: ChatGLM2Config, tp_rank: int = 0, tp_size: int = 1,
                 max_seq_len: int = settings.DEFAULT_MAX_SEQ_LEN):
        super().__init__()
        self.config = config
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.max_seq_len = max_seq_len
        self.transformer = ChatGLM2Model(config, tp_size)
        self.kv_cache: torch.Tensor | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        tp_rank: int = 0, tp_size: int = 1, max_seq_len: int | None = None,
                        quant_path: str | Path | None = None, compress_path: str | Path | None = None,
                        show_progress: bool = False) -> "ChatGLM2ForCausalLM":
        """Load a checkpoint directory (HF layout); with tp_size > 1, this rank's part from process_weights.py.

        device: "auto" / "npu" / "cuda" / "cpu" / a torch.device (default: auto, using device index tp_rank);
        dtype: default fp16 on NPU/GPU, bf16 on a CPU with native bf16, else fp32. max_seq_len, quant_path (W8A8
        weights from export_quant_weight.py) and compress_path (their sparse compressed form) default to the seed's
        environment variables (MAX_SEQ_LEN, ENABLE_QUANT + QUANT_WEIGHT_PATH, ENABLE_SPARSE + COMPRESS_WEIGHT_PATH).
        """
        return load_pretrained(cls, path, device, dtype, tp_rank, tp_size, max_seq_len, quant_path, compress_path,
                               show_progress)

    @property
    def device(self) -> torch.device:
        return self.transformer.embedding.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.embedding.word_embeddings.weight.dtype

    def _hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor, key_valid: torch.Tensor,
                       has_padding: bool, start: int, use_cache: bool) -> torch.Tensor:
        cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]
        mask = attention_mask(key_valid, has_padding, start, input_ids.shape[1])
        x = self.transformer.embedding.word_embeddings(input_ids)
        for i, layer in enumerate(self.transformer.encoder.layers):
            x = layer(x, cos, sin, mask, self.kv_cache[i] if use_cache else None, start)
        return self.transformer.encoder.final_layernorm(x)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.transformer.output_layer(hidden)
        if self.tp_size > 1:
            logits = collectives.all_gather_last_dim(logits)
        return logits.float()

    @staticmethod
    def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
        """Left padding: pad positions get 0 and each row's first real token is position 0."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                last_logit_only: bool = False) -> torch.Tensor:
        """Logits [batch, seq, vocab] in fp32, without a KV cache (for scoring); [batch, 1, vocab] for the last
        position only with last_logit_only, which spares the vocabulary projection of every other position."""
        input_ids = input_ids.to(self.device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        if input_ids.shape[1] > self.max_seq_len:
            raise InputError(f"input of {input_ids.shape[1]} tokens exceeds MAX_SEQ_LEN={self.max_seq_len}; "
                             f"shorten it or export MAX_SEQ_LEN={input_ids.shape[1]}")
        hidden = self._hidden_states(input_ids, self._position_ids(mask), mask.bool(), not bool(mask.all()), 0, False)
        return self._logits(hidden[:, -1:] if last_logit_only else hidden)

    def _ensure_kv_cache(self, batch: int) -> None:
        """One preallocated cache [layers, K/V, batch, kv_groups, MAX_SEQ_LEN, head_dim], kept between calls."""
        attn = self.transformer.encoder.layers[0].self_attention
        shape = (self.config.num_layers, 2, batch, attn.num_kv_groups, self.max_seq_len, attn.head_dim)
        if self.kv_cache is None or self.kv_cache.shape != shape or self.kv_cache.dtype != self.dtype:
            self.kv_cache = None
            self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _sampling_generator(self, seed: int | None) -> torch.Generator:
        """Every rank must draw the same token, so rank 0's seed is used everywhere."""
        seed = collectives.broadcast_object(random.randrange(2 ** 63) if seed is None else seed)
        return torch.Generator(device=self.device).manual_seed(seed)

    @torch.inference_mode()
    def generate_stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        max_new_tokens: int = 256, do_sample: bool = False, temperature: float = 1.0,
                        top_p: float = 1.0, top_k: int = 0, eos_token_id: int | None = None,
                        pad_token_id: int | None = None, ignore_eos: bool = False,
                        seed: int | None = None) -> Iterator[torch.Tensor]:
        """Yield the next token of every row [batch] per step: a prefill, then one-token decode steps.

        Rows that finished (EOS) get pad_token_id; it stops when every row has finished, unless ignore_eos.
        """
        input_ids = input_ids.to(self.device)
        batch, prompt_len = input_ids.shape
        if prompt_len == 0:
            raise InputError("the prompt is empty; give at least one token")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if prompt_len + max_new_tokens > self.max_seq_len:
            raise InputError(f"a prompt of {prompt_len} tokens plus {max_new_tokens} new tokens exceeds "
                             f"MAX_SEQ_LEN={self.max_seq_len}; shorten it or export MAX_SEQ_LEN={prompt_len + max_new_tokens}")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        if not bool(mask.any(dim=-1).all()):
            raise InputError("a prompt row is all padding; every row needs at least one token")
        eos_token_id = self.config.eos_token_id if eos_token_id is None else eos_token_id
        pad_token_id = self.config.pad_token_id if pad_token_id is None else pad_token_id
        generator = self._sampling_generator(seed) if do_sample else None

        key_valid = torch.ones(batch, prompt_len + max_new_tokens, dtype=torch.bool, device=self.device)
        key_valid[:, :prompt_len] = mask.bool()
        has_padding = not bool(mask.all())
        position_ids = self._position_ids(mask)
        self._ensure_kv_cache(batch)
        hidden = self._hidden_states(input_ids, position_ids, key_valid, has_padding, 0, True)
        next_position = position_ids[:, -1:] + 1
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        for step in range(max_new_tokens):
            logits = self._logits(hidden[:, -1])
            token = sampling.next_token(logits, do_sample, temperature, top_p, top_k, generator)
            if not ignore_eos:
                token = torch.where(finished, pad_token_id, token)
                finished |= token == eos_token_id
            yield token
            if step == max_new_tokens - 1 or (not ignore_eos and bool(finished.all())):
                return
            hidden = self._hidden_states(token[:, None], next_position, key_valid, has_padding, prompt_len + step, True)
            next_position += 1

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 256,
                 **kwargs) -> torch.Tensor:
        """New tokens only, int64 [batch, steps]; rows that stopped early are padded with the pad id."""
        tokens = list(self.generate_stream(input_ids, attention_mask, max_new_tokens, **kwargs))
        return torch.stack(tokens, dim=1)

    def stream_chat(self, tokenizer: ChatGLM2Tokenizer, query: str, history: Sequence[tuple[str, str]] | None = None,
                    max_length: int = 8192, do_sample: bool = True, top_p: float = 0.8, temperature: float = 0.8,
                    top_k: int = 0, seed: int | None = None) -> Iterator[tuple[str, list[tuple[str, str]]]]:
        """Yield (response so far, history + [(query, response)]) as THUDM's stream_chat does.

        max_length counts prompt and answer together and is capped at MAX_SEQ_LEN.
        """
        history = list(history or [])
        if not query.strip():
            raise InputError("the message is empty; type something to ask")
        input_ids = tokenizer(tokenizer.build_prompt(query, history))["input_ids"]
        budget = min(max_length, self.max_seq_len) - input_ids.shape[1]
        if budget < 1:
            raise InputError(f"the conversation is {input_ids.shape[1]} tokens, which leaves no room under "
                             f"max_length/MAX_SEQ_LEN={min(max_length, self.max_seq_len)}; clear the history or raise MAX_SEQ_LEN")
        tokens, response = [], ""
        for token in self.generate_stream(input_ids, max_new_tokens=budget, do_sample=do_sample, top_p=top_p,
                                          temperature=temperature, top_k=top_k, seed=seed):
            if int(token[0]) == self.config.eos_token_id:
                break
            tokens.append(int(token[0]))
            text = tokenizer.decode(tokens)
            if text and not text.endswith("\ufffd"):  # wait for the rest of a split multi-byte character
                response = text.strip()
                yield response, history + [(query, response)]
        final = tokenizer.decode(tokens).strip()
        if final != response or not tokens:
            yield final, history + [(query, final)]

    def chat(self, tokenizer: ChatGLM2Tokenizer, query: str, history: Sequence[tuple[str, str]] | None = None,
             **kwargs) -> tuple[str, list[tuple[str, str]]]:
        response, new_history = "", list(history or [])
        for response, new_history in self.stream_chat(tokenizer, query, history, **kwargs):
            pass
        return response, new_history
