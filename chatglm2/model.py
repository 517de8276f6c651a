"""ChatGLM2-6B for inference on Ascend NPU, NVIDIA GPU or CPU: the model and its three kinds of forward pass.

The module layout and parameter names mirror THUDM/chatglm2-6b, so a Hugging Face checkpoint (or a tensor-parallel
part written by process_weights.py) loads by name. The heavy operators come from ops.py. A forward pass is one of:
scoring (`forward`: a left-padded batch, no cache), a prefill (prompts packed into one row, written into their
blocks of the paged KV pool, see kv_pool.py) or a decode step (one token per sequence, static shapes: positions and block tables
live in tensors, and the pool slots to write and read and the attention mask are built from them on the device, so
the step can be compiled and captured in a CUDA graph). Attention reads only the blocks of each row's live context.
"""
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from chatglm2 import collectives, generation, ops, settings
from chatglm2.compiled import CompiledDecode, bucket
from chatglm2.config import ChatGLM2Config
from chatglm2.errors import InputError
from chatglm2.loading import load_pretrained
from chatglm2.kv_pool import BLOCK_SIZE, NULL_BLOCK, BlockPool, padded_block_tables
from chatglm2.memory import check_kv_cache_fits, kv_pool_shape
from chatglm2.ops import RMSNorm
from chatglm2.tokenizer import ChatGLM2Tokenizer
from chatglm2.weight_only import DEFAULT_GROUP_SIZE


@dataclass
class Attend:
    """How one forward pass's queries attend, and where their keys and values go in the KV pool.

    The pool holds each layer's keys (and values) as [pool tokens, groups, head_dim]; a token's place in it is its
    pool slot, block * BLOCK_SIZE + position % BLOCK_SIZE. write_slots [batch, seq]: where this pass's keys and values
    go (None: nowhere, for scoring). read_slots [batch, key_len]: the keys each row attends over, read back from the
    pool after the write (None: the pass's own keys). mask: bool [batch, 1, seq, key_len], True = may attend, or None
    for causal attention (or, with read_slots, every key read). segments: a packed prefill's sequences, each
    attending on its own (Segment); tokens after the last segment are padding.
    """
    mask: torch.Tensor | None = None
    write_slots: torch.Tensor | None = None
    read_slots: torch.Tensor | None = None
    segments: list["Segment"] | None = None


@dataclass
class Segment:
    """Where one sequence's tokens sit in a packed prefill pass (one row holding several sequences): tokens
    start..start+length-1 of the row. With read_slots [1, key_len] they attend over those pool slots (the sequence's
    positions 0..key_len-1, the earlier ones written by earlier passes) limited by mask [1, 1, length, key_len];
    without, the sequence starts here and attends causally over its own keys."""
    start: int
    length: int
    read_slots: torch.Tensor | None = None
    mask: torch.Tensor | None = None


def pool_slots(block_tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The pool slots of `positions` [rows, n] of each row's sequence, from its block table [rows, blocks]."""
    return block_tables.gather(1, positions // BLOCK_SIZE) * BLOCK_SIZE + positions % BLOCK_SIZE


class SelfAttention(nn.Module):
    """Multi-query attention; under tensor parallel this rank holds heads/tp query heads and its KV group."""

    def __init__(self, config: ChatGLM2Config, tp_size: int):
        super().__init__()
        self.num_heads = config.num_attention_heads // tp_size
        self.num_kv_groups = config.rank_kv_groups(tp_size)
        self.head_dim = config.kv_channels
        self.tp_size = tp_size
        qkv_size = (self.num_heads + 2 * self.num_kv_groups) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, qkv_size, bias=config.add_qkv_bias)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend,
                layer_cache: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        batch, seq, _ = x.shape
        heads, groups = self.num_heads, self.num_kv_groups
        qkv = self.query_key_value(x).view(batch, seq, heads + 2 * groups, self.head_dim)
        q, k = ops.apply_rotary(qkv[:, :, :heads + groups], cos, sin).split([heads, groups], dim=2)  # one rotation
        v = qkv[:, :, heads + groups:]
        k_pool, v_pool = layer_cache or (None, None)
        if attend.write_slots is not None:
            slots = attend.write_slots.flatten()
            k_pool[slots] = k.flatten(0, 1)
            v_pool[slots] = v.flatten(0, 1)
        if attend.segments is not None:
            out = self.dense(self.packed_attention(q, k, v, attend.segments, k_pool, v_pool))
        else:
            if attend.read_slots is not None:
                k, v = k_pool[attend.read_slots], v_pool[attend.read_slots]
            out = self.dense(ops.attention(q, k.transpose(1, 2), v.transpose(1, 2), attend.mask))
        return collectives.all_reduce_sum(out) if self.tp_size > 1 else out

    def packed_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: list[Segment],
                         k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """Each segment of a packed row [1, seq, ...] attends on its own; padding after them gets zeros."""
        outs = []
        for segment in segments:
            span = slice(segment.start, segment.start + segment.length)
            if segment.read_slots is None:
                keys, values = k[:, span], v[:, span]
            else:
                keys, values = k_pool[segment.read_slots], v_pool[segment.read_slots]
            outs.append(ops.attention(q[:, span], keys.transpose(1, 2), values.transpose(1, 2), segment.mask))
        padding = q.shape[1] - sum(segment.length for segment in segments)
        if padding:
            outs.append(q.new_zeros(1, padding, self.num_heads * self.head_dim))
        return torch.cat(outs, dim=1)


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend,
                layer_cache: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), cos, sin, attend, layer_cache)
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


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Bool [batch, 1, seq, seq] (True = may attend) for a left-padded batch, or None when causal attention is exact.

    A padding query row may attend to itself only, so that it never sees an all-masked row (NaN).
    """
    if bool(attention_mask.all()):
        return None
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    causal = positions[None, :] <= positions[:, None]
    mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
    return mask | torch.eye(len(positions), dtype=torch.bool, device=attention_mask.device)[None, None]


# A prefill runs in passes of at most PREFILL_PASS tokens, each padded to the next of PREFILL_SIZES (waste: at most
# 63 tokens past 64; a few percent of a long pass).
PREFILL_PASS = 512
PREFILL_SIZES = [16, 32, *range(64, PREFILL_PASS + 1, 64)]


class ChatGLM2ForCausalLM(nn.Module):
    def __init__(self, config: ChatGLM2Config, tp_rank: int = 0, tp_size: int = 1,
                 max_seq_len: int = settings.DEFAULT_MAX_SEQ_LEN):
        super().__init__()
        self.config = config
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.max_seq_len = max_seq_len
        self.transformer = ChatGLM2Model(config, tp_size)
        self.kv_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (keys, values) of each layer
        self.kv_blocks: BlockPool | None = None  # which blocks of kv_cache hold what
        self.compile = False  # whether allocate_kv_cache compiles (and on CUDA captures) the decode step
        self.compiled_decode: CompiledDecode | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        tp_rank: int = 0, tp_size: int = 1, max_seq_len: int | None = None,
                        quant_path: str | Path | None = None, compress_path: str | Path | None = None,
                        show_progress: bool = False, compile: str = "auto", quantize: str | None = None,
                        group_size: int = DEFAULT_GROUP_SIZE, quantize_output_layer: str | None = "auto",
                        quantize_attention: str = "auto", quantize_activations: str | None = None,
                        kv_cache_tokens: int | None = None) -> "ChatGLM2ForCausalLM":
        """Load a checkpoint directory (HF layout); with tp_size > 1, this rank's part from process_weights.py.

        device: "auto" / "npu" / "cuda" / "cpu" / a torch.device (default: auto, using device index tp_rank);
        dtype: default fp16 on NPU/GPU, bf16 on a CPU with native bf16, else fp32. max_seq_len, quant_path (W8A8
        weights from export_quant_weight.py) and compress_path (their sparse compressed form) default to the seed's
        environment variables (MAX_SEQ_LEN, ENABLE_QUANT + QUANT_WEIGHT_PATH, ENABLE_SPARSE + COMPRESS_WEIGHT_PATH).
        compile: "auto" (on for CUDA), "on" or "off": the decode step compiled by inductor, and on CUDA captured in
        CUDA graphs, when the KV cache is allocated.
        quantize: "int8" / "int4" quantizes the four encoder linears of every layer as they load (weight-only; int4 in
        groups of group_size input columns); a THUDM quantized checkpoint ("quantization_bit" in config.json) loads
        as weight-only by itself. quantize_output_layer: what output_layer becomes in a weight-only model ("auto": the
        same format as the other layers, or float for THUDM's checkpoints, which store it so; "int8", "int4", or None
        for float); quantize_attention: the same for
        query_key_value and self_attention.dense under quantize ("int8" with int4: more accurate, more bytes);
        quantize_activations="int8": int8 layers round each input row to 8 bits at run time (fbgemm's integer GEMM on
        x86 CPUs: faster, a little less accurate). See weight_only.py and weight_only_linear.py.
        kv_cache_tokens: the size of the KV cache it will use (default MAX_SEQ_LEN: one sequence; a batch needs
        rows x MAX_SEQ_LEN); that cache and the weights must fit in the free memory together, which is checked
        before any weight is read.
        """
        return load_pretrained(cls, path, device, dtype, tp_rank, tp_size, max_seq_len, quant_path, compress_path,
                               show_progress, compile=compile, quantize=quantize, group_size=group_size,
                               quantize_output_layer=quantize_output_layer, quantize_attention=quantize_attention,
                               quantize_activations=quantize_activations, kv_cache_tokens=kv_cache_tokens)

    @property
    def device(self) -> torch.device:
        return self.transformer.embedding.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.embedding.word_embeddings.weight.dtype

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """The final-normed hidden states [batch, seq, hidden] of tokens at `positions` [batch, seq]."""
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x = self.transformer.embedding.word_embeddings(input_ids)
        for i, layer in enumerate(self.transformer.encoder.layers):
            x = layer(x, cos, sin, attend, None if self.kv_cache is None else self.kv_cache[i])
        return self.transformer.encoder.final_layernorm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.transformer.output_layer(hidden)
        if self.tp_size > 1:
            logits = collectives.all_gather_last_dim(logits)
        return logits.float()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                last_logit_only: bool = False) -> torch.Tensor:
        """Logits [batch, seq, vocab] in fp32 of a left-padded batch, without a KV cache (for scoring); [batch, 1,
        vocab] for the last position only with last_logit_only, which spares the vocabulary projection of the rest."""
        input_ids = input_ids.to(self.device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        if input_ids.shape[1] > self.max_seq_len:
            raise InputError(f"input of {input_ids.shape[1]} tokens exceeds MAX_SEQ_LEN={self.max_seq_len}; "
                             f"shorten it or export MAX_SEQ_LEN={input_ids.shape[1]}")
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # pad positions get 0; each row's first token is 0
        hidden = self.hidden_states(input_ids, positions, Attend(mask=padding_mask(mask)))
        return self.logits(hidden[:, -1:] if last_logit_only else hidden)

    def allocate_kv_cache(self, tokens: int, max_rows: int) -> None:
        """A pool of blocks for `tokens` tokens, keys and values of each layer [pool tokens, kv_groups, head_dim] (see
        Attend), with its bookkeeping (kv_blocks); kept between calls of the same size, with the prefixes it caches
        (the turns of a chat); its size is checked against the free memory first. With compile on, the decode step
        compiled for up to max_rows rows. Separate tensors per layer, not views of one: the compiled step then writes
        each in place, where a write into a view of a shared base makes inductor copy the whole base every step."""
        shape = kv_pool_shape(self.config, tokens, self.tp_size)
        if self.kv_cache is None or self.kv_cache[0][0].shape != shape or self.kv_cache[0][0].dtype != self.dtype:
            self.kv_cache, self.kv_blocks, self.compiled_decode = None, None, None
            # from_pretrained checked a cache with the weights; this one may be larger, and the memory now free counts
            check_kv_cache_fits(self.config, tokens, self.max_seq_len, self.tp_size, self.dtype, self.device)
            # zeros, not empty: a masked key's value still meets a zero weight, and 0 * NaN would be NaN
            self.kv_cache = [tuple(torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(2))
                             for _ in range(self.config.num_layers)]
            self.kv_blocks = BlockPool(shape[0] // BLOCK_SIZE)
        if self.compile and (self.compiled_decode is None or self.compiled_decode.max_rows < max_rows):
            self.compiled_decode = CompiledDecode(self, max_rows)

    def kv_cache_summary(self) -> str:
        """The pool's size in words, for the benchmarks' output."""
        cache_bytes = sum(t.numel() * t.element_size() for pair in self.kv_cache for t in pair)
        return (f"KV cache pool: {self.kv_blocks.num_blocks - 1} blocks of {BLOCK_SIZE} tokens "
                f"({self.kv_blocks.capacity_tokens} tokens, {cache_bytes / 2 ** 20:.1f} MiB on this rank)")

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor, key_len: int,
               masked: bool) -> torch.Tensor:
        """decode_step, compiled and captured when the model was loaded with compile on."""
        if self.compiled_decode is not None:
            return self.compiled_decode(tokens, positions, block_tables, key_len)
        return self.decode_step(tokens, positions, block_tables, key_len, masked)

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], block_tables: Sequence[Sequence[int]],
                starts: Sequence[int] | None = None) -> torch.Tensor:
        """Run the prompts and write their keys and values into the pool blocks of their block tables; the logits
        [len(prompts), vocab] (fp32) of each prompt's last token. With `starts`, each prompt continues its sequence at
        position starts[i], after the tokens before it (written by earlier calls, or cached blocks of a shared
        prefix), whose keys it reads from the pool.

        The prompts are packed into one row, cut into passes of at most PREFILL_PASS tokens, each padded to one of
        PREFILL_SIZES: the linear layers see only those few shapes, however the lengths vary (a CPU's oneDNN keeps
        kernels and buffers per shape, so a server seeing every length would grow without bound), and no row is
        padded to the longest prompt."""
        starts = list(starts or [0] * len(prompts))
        tokens = [(row, start + offset, token) for row, (prompt, start) in enumerate(zip(prompts, starts))
                  for offset, token in enumerate(prompt)]
        tables = padded_block_tables(block_tables, 1, self.device)
        last_hidden = [None] * len(prompts)
        for first in range(0, len(tokens), PREFILL_PASS):
            piece = tokens[first:first + PREFILL_PASS]
            hidden, segments = self.prefill_pass(piece, tables)
            for segment in segments:  # a prompt cut between passes: its last pass writes last
                last_hidden[piece[segment.start][0]] = hidden[0, segment.start + segment.length - 1]
        return self.logits(torch.stack(last_hidden))

    def prefill_pass(self, piece: list[tuple[int, int, int]], tables: torch.Tensor) -> tuple[torch.Tensor,
                                                                                            list[Segment]]:
        """One packed pass over (row, position, token) triples, padded to a PREFILL_SIZES size: the hidden states
        [1, size, hidden] and the segments of its rows."""
        device, size = self.device, bucket(PREFILL_SIZES, len(piece))
        segments, start = [], 0
        for row, run in itertools.groupby(piece, key=lambda triple: triple[0]):
            first_position, length = piece[start][1], len(list(run))
            segment = Segment(start, length)
            if first_position > 0:  # continues what the pool holds: read it back, causally aligned to the end
                keys = torch.arange(first_position + length, device=device)
                queries = torch.arange(first_position, first_position + length, device=device)
                segment.read_slots = pool_slots(tables[row:row + 1], keys[None])
                segment.mask = (keys[None, :] <= queries[:, None])[None, None]
            segments.append(segment)
            start += length
        rows = torch.tensor([row for row, _, _ in piece], device=device)
        positions = torch.tensor([position for _, position, _ in piece], device=device)
        padding = size - len(piece)
        # padding tokens sit at position 0 and are written to the null block
        write_slots = torch.cat([pool_slots(tables[rows], positions[:, None])[:, 0],
                                 torch.arange(padding, device=device) % BLOCK_SIZE + NULL_BLOCK * BLOCK_SIZE])
        input_ids = torch.tensor([token for _, _, token in piece] + [0] * padding, device=device)
        positions = torch.cat([positions, torch.zeros(padding, dtype=torch.long, device=device)])
        attend = Attend(write_slots=write_slots[None], segments=segments)
        return self.hidden_states(input_ids[None], positions[None], attend), segments

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor, key_len: int,
                    masked: bool) -> torch.Tensor:
        """One token for each row, at `positions`, of the sequence whose blocks are in its row of block_tables [rows,
        at least blocks_for(key_len)]: the logits [rows, vocab] (fp32). Each row attends over its positions
        0..key_len-1 (masked to its own length unless masked=False, for rows that all sit at key_len - 1).

        Shapes depend only on the number of rows and key_len and nothing is read back to the host, so the step can
        be compiled and captured. Call it under torch.inference_mode(), as the engine does."""
        keys = torch.arange(key_len, device=tokens.device)
        mask = (keys[None, :] <= positions[:, None])[:, None, None, :] if masked else None
        attend = Attend(mask=mask, write_slots=pool_slots(block_tables, positions[:, None]),
                        read_slots=pool_slots(block_tables, keys.expand(tokens.shape[0], key_len)))
        return self.logits(self.hidden_states(tokens[:, None], positions[:, None], attend)[:, 0])

    def generate_stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        max_new_tokens: int = 256, do_sample: bool = False, temperature: float = 1.0,
                        top_p: float = 1.0, top_k: int = 0, eos_token_id: int | None = None,
                        pad_token_id: int | None = None, ignore_eos: bool = False,
                        seed: int | None = None, prefix_caching: bool = True,
                        stop_token_ids: Sequence[int] = ()) -> Iterator[torch.Tensor]:
        """Yield the next token of every row [batch] per step: a prefill, then one-token decode steps.

        Rows that finished (EOS, or one of stop_token_ids) get pad_token_id; it stops when every row has finished,
        unless ignore_eos. Every row is a request of its own on the continuous-batching engine, admitted together.
        With prefix_caching, the blocks of the KV pool that earlier calls left cached are reused where a prompt starts
        with their tokens.
        """
        return generation.generate_stream(self, input_ids, attention_mask, max_new_tokens, do_sample, temperature,
                                          top_p, top_k, eos_token_id, pad_token_id, ignore_eos, seed, prefix_caching,
                                          stop_token_ids)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 256,
                 **kwargs) -> torch.Tensor:
        """New tokens only, int64 [batch, steps]; rows that stopped early are padded with the pad id."""
        tokens = list(self.generate_stream(input_ids, attention_mask, max_new_tokens, **kwargs))
        return torch.stack(tokens, dim=1)

    def stream_chat(self, tokenizer: ChatGLM2Tokenizer, query: str, history: Sequence[Any] | None = None,
                    max_length: int = 8192, do_sample: bool = True, top_p: float = 0.8, temperature: float = 0.8,
                    top_k: int = 0, seed: int | None = None, system: str | None = None) -> Iterator[tuple[str, list]]:
        """Yield (response so far, history with this turn) as THUDM's stream_chat does: ChatGLM2's history is
        (query, response) pairs, ChatGLM3's and GLM-4's {"role", "content"} messages; `system` adds a system message.

        max_length counts prompt and answer together and is capped at MAX_SEQ_LEN.
        """
        return generation.stream_chat(self, tokenizer, query, history, max_length, do_sample, top_p, temperature,
                                      top_k, seed, system)

    def chat(self, tokenizer: ChatGLM2Tokenizer, query: str, history: Sequence[Any] | None = None,
             **kwargs) -> tuple[str, list]:
        response, new_history = "", list(history or [])
        for response, new_history in self.stream_chat(tokenizer, query, history, **kwargs):
            pass
        return response, new_history
