"""The model's generation API (generate_stream, stream_chat) on the continuous-batching engine.

Each row of a batch is a request of its own; all are admitted at once into a batch-sized engine, so the first
step is one prefill of every row and each later step one decode step of every unfinished row: the seed's timing
semantics. Under tensor parallel every rank calls these with the same arguments and gets the same tokens.
"""
import random
from typing import Any, Iterable, Iterator, Sequence

import torch

from chatglm2 import collectives
from chatglm2.engine import Engine, SamplingParams
from chatglm2.errors import InputError
from chatglm2.tokenizer import ChatGLM2Tokenizer


def generate_stream(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                    do_sample: bool, temperature: float, top_p: float, top_k: int, eos_token_id: int | None,
                    pad_token_id: int | None, ignore_eos: bool, seed: int | None,
                    prefix_caching: bool = True, stop_token_ids: Sequence[int] = ()) -> Iterator[torch.Tensor]:
    """Yield the next token of every row [batch] per step; rows that finished get pad_token_id. The model's KV pool
    outlives the call, so with prefix_caching a later prompt that starts as this one (or as its answer's
    continuation: the next turn of a chat) prefills only what is new."""
    batch, prompt_len = input_ids.shape
    if prompt_len == 0:
        raise InputError("the prompt is empty; give at least one token")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if not bool(mask.any(dim=-1).all()):
        raise InputError("a prompt row is all padding; every row needs at least one token")
    if prompt_len + max_new_tokens > model.max_seq_len:  # the padded width, as before the engine
        raise InputError(f"a prompt of {prompt_len} tokens plus {max_new_tokens} new tokens exceeds "
                         f"MAX_SEQ_LEN={model.max_seq_len}; shorten it or export MAX_SEQ_LEN={prompt_len + max_new_tokens}")
    pad_token_id = model.config.pad_token_id if pad_token_id is None else pad_token_id
    base_seed = collectives.broadcast_object(random.randrange(2 ** 62) if seed is None else seed) if do_sample else None
    engine = Engine(model, batch, prefix_caching=prefix_caching)
    requests = [engine.submit(row[keep.bool()].tolist(),
                              SamplingParams(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                             temperature=temperature, top_p=top_p, top_k=top_k,
                                             seed=None if base_seed is None else base_seed + i,
                                             eos_token_id=eos_token_id, ignore_eos=ignore_eos,
                                             stop_token_ids=tuple(stop_token_ids)))
                for i, (row, keep) in enumerate(zip(input_ids.cpu(), mask.cpu()))]
    try:
        for step in range(max_new_tokens):
            if all(r.finished and len(r.tokens) <= step for r in requests):
                return
            engine.step()
            yield torch.tensor([r.tokens[step] if len(r.tokens) > step else pad_token_id for r in requests])
    finally:
        engine.close()  # a caller that stops early leaves no block of the pool held


def stream_chat(model, tokenizer: ChatGLM2Tokenizer, query: str, history: Sequence[Any] | None, max_length: int,
                do_sample: bool, top_p: float, temperature: float, top_k: int, seed: int | None,
                system: str | None = None) -> Iterator[tuple[str, list[Any]]]:
    """Yield (response so far, history with this turn) as THUDM's stream_chat does: ChatGLM2's history is (query,
    response) pairs, ChatGLM3's and GLM-4's a list of {"role", "content"} messages (which may start with a system
    message). `system` puts a system message before the conversation."""
    history = list(history or [])
    if not query.strip():
        raise InputError("the message is empty; type something to ask")
    prompt_ids = chat_input(tokenizer, query, history, system)
    budget = answer_budget(len(prompt_ids), max_length, model.max_seq_len)
    tokens = (int(token[0]) for token in model.generate_stream(torch.tensor([prompt_ids]), max_new_tokens=budget,
                                                               do_sample=do_sample, top_p=top_p,
                                                               temperature=temperature, top_k=top_k, seed=seed,
                                                               stop_token_ids=tokenizer.chat_stop_ids))
    for response in response_texts(tokenizer, tokens, tokenizer.chat_stop_ids):
        yield response, history_with(tokenizer, history, query, response)


def chat_input(tokenizer: ChatGLM2Tokenizer, query: str, history: Sequence[Any], system: str | None = None) -> list[int]:
    """A chat turn's prompt ids in the model's own format: ChatGLM2's `[Round N]` text (a system message glued
    before the first question), or ChatGLM3's / GLM-4's role messages."""
    if tokenizer.chat_family == "chatglm2":
        query, pairs = chat_history(system, list(history), query)
        return tokenizer.encode(tokenizer.build_prompt(query, pairs))
    system_message = [{"role": "system", "content": system}] if system else []
    return tokenizer.build_chat_input(system_message + list(history) + [{"role": "user", "content": query}])


def history_with(tokenizer: ChatGLM2Tokenizer, history: list[Any], query: str, response: str) -> list[Any]:
    if tokenizer.chat_family == "chatglm2":
        return history + [(query, response)]
    return history + [{"role": "user", "content": query}, {"role": "assistant", "content": response}]


def answer_budget(prompt_len: int, max_length: int, max_seq_len: int) -> int:
    """New tokens a chat turn may have: max_length counts prompt and answer together and is capped at MAX_SEQ_LEN."""
    limit = min(max_length, max_seq_len)
    if limit - prompt_len < 1:
        raise InputError(f"the conversation is {prompt_len} tokens, which leaves no room under "
                         f"max_length/MAX_SEQ_LEN={limit}; clear the history or raise MAX_SEQ_LEN")
    return limit - prompt_len


def response_texts(tokenizer: ChatGLM2Tokenizer, tokens: Iterable[int], stop_ids: Sequence[int]) -> Iterator[str]:
    """The growing answer, stripped, after each new token up to a stop token (skipping states that end in a split
    multi-byte character), then the final one if it differs: what a chat page shows."""
    ids, response = [], ""
    for token in tokens:
        if token in stop_ids:
            break
        ids.append(token)
        text = tokenizer.decode(ids)
        if text and not text.endswith("\ufffd"):  # wait for the rest of a split multi-byte character
            response = text.strip()
            yield response
    final = tokenizer.decode(ids).strip()
    if final != response or not ids:
        yield final


def chat_history(system: str | None, pairs: list[tuple[str, str]], query: str) -> tuple[str, list[tuple[str, str]]]:
    """(query, history) for build_prompt, with a system message glued before the first user turn as THUDM's
    openai_api.py does (ChatGLM2 has no system role)."""
    if system:
        if pairs:
            pairs = [(system + pairs[0][0], pairs[0][1])] + pairs[1:]
        else:
            query = system + query
    return query, pairs
