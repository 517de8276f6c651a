"""The continuous-batching engine that every mode, the web demo and the OpenAI server run on.

The KV cache is a pool of blocks (kv_pool.py). Each iteration either admits waiting requests, oldest first, while
fewer than max_batch run and the pool has blocks for their prompts (one prefill of the prompts), or runs one decode
step for every request that has its prompt in the cache. A request first looks up its prompt's full blocks among the
cached ones (a shared system prompt, the earlier turns of a conversation, a question's common preamble) and prefills
only the rest. A finished or cancelled request gives its blocks back at once, and the next waiting one can take them.
When a decode step needs a block and none is left, the request admitted last is preempted: its blocks go back and it
waits at the head of the queue, to be prefilled again with the tokens it has so far (recompute, as vLLM does). A
request's greedy answer does not depend on what else is running: each sequence attends only to its own blocks.

With max_prefill_tokens, a prefill takes at most that many prompt tokens (a long prompt goes in chunks, each
continuing its sequence's blocks), and while any request is decoding, prefills and decode steps take turns: a long prompt
arriving delays the tokens of the others by one chunk's time at most, not by its whole prefill.

Under tensor parallel, rank 0 schedules and owns the pool's bookkeeping. Each iteration it broadcasts the plan (the
prompt chunks to prefill, or the decode rows with their tokens and positions, with their block tables, and the
cancellations), every rank runs the same forward pass, and rank 0 broadcasts the sampled tokens and finished
requests, so requests submitted on every rank (generate) end alike on every rank, and a server's other ranks just
follow.
"""
import itertools
import queue
import random
import threading
import traceback
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from chatglm2 import collectives, sampling
from chatglm2.errors import InputError
from chatglm2.kv_pool import BLOCK_SIZE, block_hashes, blocks_for, full_length_tokens, padded_block_tables

IDLE_HEARTBEAT_S = 30.0  # an idle server's rank 0 plans an empty step this often, so no collective times out


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings; they need the engine's tokenizer
    eos_token_id: int | None = None  # None: the model's (config.json's, one or a list)
    stop_token_ids: tuple[int, ...] = ()  # a chat format's end-of-turn tokens, e.g. ChatGLM3's <|user|>
    ignore_eos: bool = False


class EngineFull(Exception):
    """The waiting queue is at its bound; the caller should retry later."""


class Request:
    """One prompt being answered. Each new token id is put on `updates`, then None once it has finished; `tokens`
    holds them all and `finish_reason` says why it ended: "stop" (EOS or a stop string), "length", "cancelled" or
    "error". on_update, if given, is called (from the engine's thread) after each put."""

    def __init__(self, rid: int, prompt_ids: list[int], params: SamplingParams,
                 on_update: Callable[[], None] | None = None):
        self.id, self.prompt_ids, self.params = rid, prompt_ids, params
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.updates: queue.SimpleQueue = queue.SimpleQueue()
        self.on_update = on_update
        self.cancelled = threading.Event()
        self.prefill_ids = self.prompt_ids  # what a prefill computes: the prompt, or after preemption what came so far
        self.prefilled = 0  # tokens of prefill_ids in the KV cache so far
        self.cached_tokens = 0  # of them, found in the cache (a prefix hit) when it was admitted
        self.blocks: list[int] = []  # its block table
        self.hashes: list[bytes] = []  # the hashes of its full blocks so far (kv_pool.block_hashes)
        self.generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Stop answering; its blocks are freed at the start of the next iteration."""
        self.cancelled.set()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefill_done(self) -> bool:
        return self.prefilled == len(self.prefill_ids)

    @property
    def position(self) -> int:
        """Where a decode step writes its last token."""
        return len(self.prompt_ids) + len(self.tokens) - 1

    def stream(self) -> Iterator[int]:
        """The new token ids as they come (for a consumer in another thread than the engine's)."""
        while (token := self.updates.get()) is not None:
            yield token

    def _put(self, item: int | None) -> None:
        self.updates.put(item)
        if self.on_update:
            self.on_update()


class Engine:
    def __init__(self, model, max_batch: int, tokenizer=None, max_waiting: int | None = None,
                 max_prefill_tokens: int | None = None, kv_cache_tokens: int | None = None,
                 prefix_caching: bool = True):
        """max_batch: requests running at once (rows of a decode step); kv_cache_tokens: the pool's size (default
        max_batch x MAX_SEQ_LEN, the most they can hold); prefix_caching: reuse cached blocks of earlier prompts."""
        if max_batch < 1:
            raise InputError(f"max_batch must be at least 1, got {max_batch}")
        if max_prefill_tokens is not None and max_prefill_tokens < 1:
            raise InputError(f"max_prefill_tokens must be at least 1, got {max_prefill_tokens}")
        if kv_cache_tokens is not None and kv_cache_tokens < 1:
            raise InputError(f"kv_cache_tokens must be at least 1, got {kv_cache_tokens}")
        model.allocate_kv_cache(kv_cache_tokens or full_length_tokens(max_batch, model.max_seq_len), max_batch)
        self.model, self.max_batch, self.tokenizer, self.max_waiting = model, max_batch, tokenizer, max_waiting
        self.max_prefill_tokens, self.prefix_caching = max_prefill_tokens, prefix_caching
        self.pool = model.kv_blocks
        self.last_plan = "idle"
        self.running: list[Request] = []  # in the order they were admitted (rank 0)
        self.waiting: deque[Request] = deque()
        self.requests: dict[int, Request] = {}  # every unfinished request known on this rank
        self.ids = itertools.count()
        self.lock = threading.Condition()
        self.rank0, self.tp = collectives.is_rank0(), collectives.is_tp()
        self.finished_count: Counter[str] = Counter()  # finish reasons so far, for a server's /health
        self.preemptions = 0
        self.generated_tokens = 0

    # ------------------------------------------------------------------------------------------------- requests

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               on_update: Callable[[], None] | None = None) -> Request:
        """Queue a prompt (thread-safe). InputError for a request that cannot fit, EngineFull when the waiting
        queue is at max_waiting."""
        if not prompt_ids:
            raise InputError("the prompt is empty; give at least one token")
        if params.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {params.max_new_tokens}")
        needed = len(prompt_ids) + params.max_new_tokens
        if needed > self.model.max_seq_len:
            raise InputError(f"a prompt of {len(prompt_ids)} tokens plus {params.max_new_tokens} new tokens exceeds "
                             f"MAX_SEQ_LEN={self.model.max_seq_len}; shorten it or export MAX_SEQ_LEN={needed}")
        if needed - 1 > self.pool.capacity_tokens:  # the last new token is never written
            raise InputError(f"a prompt of {len(prompt_ids)} tokens plus {params.max_new_tokens} new tokens needs more "
                             f"than the KV cache's {self.pool.capacity_tokens} tokens; shorten it or raise "
                             f"--kv_cache_tokens (KV_CACHE_TOKENS)")
        if params.stop and self.tokenizer is None:
            raise InputError("stop strings need an engine with a tokenizer")
        with self.lock:
            if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
                raise EngineFull(f"{len(self.waiting)} requests are already waiting")
            request = Request(next(self.ids), list(prompt_ids), params, on_update)
            self.requests[request.id] = request
            self.waiting.append(request)
            self.lock.notify_all()
        return request

    def has_work(self) -> bool:
        return bool(self.waiting) or bool(self.running)

    def stats(self) -> dict:
        return {"max_batch": self.max_batch, "running": len(self.running), "waiting": len(self.waiting),
                "finished": dict(self.finished_count), "preemptions": self.preemptions,
                "generated_tokens": self.generated_tokens, "kv_cache": self.pool.stats()}

    def close(self) -> None:
        """Cancel every request at once and give its blocks back (for a caller that stops iterating early)."""
        for rid in list(self.requests):
            self._finish(rid, "cancelled")

    # ------------------------------------------------------------------------------------------------- iterations

    @torch.inference_mode()
    def step(self) -> str:
        """One iteration, on every rank together; returns the plan's kind: "prefill", "decode", "idle" or "stop"."""
        plan = self._plan() if self.rank0 else None
        if self.tp:
            plan = collectives.broadcast_object(plan)
        for rid in plan["cancelled"]:
            self._finish(rid, "cancelled")
        if plan["kind"] in ("idle", "stop"):
            return plan["kind"]
        logits = self._forward(plan)
        result = self._sample(plan, logits) if self.rank0 else None
        if self.tp:
            result = collectives.broadcast_object(result)
        self.generated_tokens += len(result["tokens"])
        for rid, token in result["tokens"].items():
            if rid in self.requests:
                self.requests[rid].tokens.append(token)
                self.requests[rid]._put(token)
        for rid, reason in result["finished"].items():
            self._finish(rid, reason)
        return plan["kind"]

    def _plan(self) -> dict:
        """Rank 0: drop cancelled requests and admit waiting ones; then prefill the prompts not yet in the cache
        (oldest first, up to max_prefill_tokens), unless the last iteration was a prefill and some request is
        decoding; else decode every request whose prompt is in the cache."""
        with self.lock:
            cancelled = [r.id for r in [*self.waiting, *self.running] if r.cancelled.is_set()]
            self.waiting = deque(r for r in self.waiting if not r.cancelled.is_set())
            for request in [r for r in self.running if r.cancelled.is_set()]:
                self._release(request)
            while self.waiting and len(self.running) < self.max_batch and self._admit(self.waiting[0]):
                self.running.append(self.waiting.popleft())
        pending = [r for r in self.running if not r.prefill_done]
        decoding = any(r.prefill_done for r in self.running)
        if pending and not (decoding and self.last_plan == "prefill"):
            self.last_plan = "prefill"
            return self._prefill_plan(pending, cancelled)
        rows = self._decode_rows()
        if not rows:
            self.last_plan = "idle"
            return {"kind": "idle", "cancelled": cancelled}
        self.last_plan = "decode"
        positions = [r.position for r in rows]
        for request in rows:
            if (request.position + 1) % BLOCK_SIZE == 0:
                self._offer_blocks(request, request.prompt_ids + request.tokens, request.position)
        return {"kind": "decode", "cancelled": cancelled, "rids": [r.id for r in rows],
                "tokens": [r.tokens[-1] for r in rows], "positions": positions,
                "tables": [r.blocks for r in rows], "uniform": len(set(positions)) == 1}

    def _admit(self, request: Request) -> bool:
        """Give a waiting request the blocks of its prefill: the cached ones of its prefix, and new ones for the rest
        (keeping at least its last token to compute, whose logits give the next token); False if the pool has too
        few."""
        ids = request.prefill_ids
        request.hashes = block_hashes(ids, request.hashes)
        hits = self.pool.match(request.hashes[:(len(ids) - 1) // BLOCK_SIZE]) if self.prefix_caching else []
        needed = blocks_for(len(ids)) - len(hits)
        if self.pool.available() < needed:
            self.pool.release(hits)
            return False
        self.pool.count_lookup(len(ids), len(hits) * BLOCK_SIZE)
        request.blocks = hits + self.pool.take(needed)
        request.prefilled = request.cached_tokens = len(hits) * BLOCK_SIZE
        if request.params.do_sample and request.generator is None:
            seed = random.randrange(2 ** 63) if request.params.seed is None else request.params.seed
            request.generator = torch.Generator(self.model.device).manual_seed(seed)
        return True

    def _decode_rows(self) -> list[Request]:
        """The requests to decode, each with a block for the position it writes: when the pool has none left, the
        request admitted last is preempted (and may be one of these)."""
        for request in [r for r in self.running if r.prefill_done]:
            if request.position // BLOCK_SIZE < len(request.blocks):
                continue
            while self.pool.available() == 0 and request in self.running:
                self._preempt(self.running[-1])
            if request in self.running:
                request.blocks += self.pool.take(1)
        return [r for r in self.running if r.prefill_done]

    def _preempt(self, request: Request) -> None:
        """Give back a running request's blocks and queue it first, to be prefilled again with what it has so far;
        its answer goes on as if nothing happened (its tokens and its sampler's state are kept)."""
        with self.lock:
            self._release(request)
            request.prefill_ids = request.prompt_ids + request.tokens
            request.prefilled = request.cached_tokens = 0
            self.waiting.appendleft(request)
        self.preemptions += 1

    def _release(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
        self.pool.release(request.blocks)
        request.blocks = []

    def _offer_blocks(self, request: Request, sequence: list[int], written_from: int) -> None:
        """Offer for reuse the request's blocks that this iteration fills: `sequence` is what its cache holds after
        it, the positions from written_from on are this iteration's."""
        if self.prefix_caching:
            request.hashes = block_hashes(sequence, request.hashes)
            for index in range(written_from // BLOCK_SIZE, len(sequence) // BLOCK_SIZE):
                self.pool.register(request.blocks[index], request.hashes[index])

    def _prefill_plan(self, pending: list[Request], cancelled: list[int]) -> dict:
        """The next chunk of each pending prompt, within max_prefill_tokens; only the rows whose prompt it completes
        are sampled (their rid is set)."""
        budget = self.max_prefill_tokens or sum(len(r.prefill_ids) - r.prefilled for r in pending)
        chunks = []
        for request in pending:
            if budget == 0:
                break
            take = min(len(request.prefill_ids) - request.prefilled, budget)
            chunks.append((request, request.prefilled, take))
            request.prefilled += take
            budget -= take
            self._offer_blocks(request, request.prefill_ids[:request.prefilled], request.prefilled - take)
        return {"kind": "prefill", "cancelled": cancelled,
                "rids": [r.id if r.prefill_done else None for r, _, _ in chunks],
                "tables": [r.blocks for r, _, _ in chunks], "starts": [start for _, start, _ in chunks],
                "prompts": [r.prefill_ids[start:start + take] for r, start, take in chunks]}

    def _forward(self, plan: dict) -> torch.Tensor:
        if plan["kind"] == "prefill":
            return self.model.prefill(plan["prompts"], plan["tables"], plan["starts"])
        device = self.model.device
        key_len = max(plan["positions"]) + 1
        tokens = torch.tensor(plan["tokens"], device=device)
        positions = torch.tensor(plan["positions"], device=device)
        tables = padded_block_tables(plan["tables"], blocks_for(key_len), device)
        return self.model.decode(tokens, positions, tables, key_len, not plan["uniform"])

    def _sample(self, plan: dict, logits: torch.Tensor) -> dict:
        """Rank 0: each request's next token with its own settings, and which requests this token finishes."""
        rows = [(row, self.requests[rid]) for row, rid in enumerate(plan["rids"]) if rid is not None]
        greedy = [row for row, r in rows if not r.params.do_sample]
        chosen = dict(zip(greedy, sampling.next_token(logits[greedy], False).tolist())) if greedy else {}
        for row, r in rows:
            if r.params.do_sample:
                p = r.params
                chosen[row] = int(sampling.next_token(logits[row:row + 1], True, p.temperature, p.top_p, p.top_k,
                                                      r.generator)[0])
        tokens, finished = {}, {}
        for row, r in rows:
            tokens[r.id] = chosen[row]
            reason = self._finish_reason(r, chosen[row])
            if reason:
                finished[r.id] = reason
        return {"tokens": tokens, "finished": finished}

    def _finish_reason(self, request: Request, token: int) -> str | None:
        params, count = request.params, len(request.tokens) + 1
        eos = self.model.config.eos_token_ids if params.eos_token_id is None else (params.eos_token_id,)
        if (token in eos or token in params.stop_token_ids) and not params.ignore_eos:
            return "stop"
        if params.stop and any(stop in self.tokenizer.decode(request.tokens + [token]) for stop in params.stop):
            return "stop"
        if count >= params.max_new_tokens or len(request.prompt_ids) + count >= self.model.max_seq_len:
            return "length"
        return None

    def _finish(self, rid: int, reason: str) -> None:
        with self.lock:
            request = self.requests.pop(rid, None)
            if request is None:
                return
            if self.rank0:
                self._release(request)
        request.finish_reason = reason
        self.finished_count[reason] += 1
        request._put(None)

    # ------------------------------------------------------------------------------------------------- serving

    def serve_forever(self, stopping: threading.Event) -> None:
        """Rank 0 of a server, in its own thread: iterate while there is work, until `stopping` is set; then end
        every request and (under tensor parallel) tell the other ranks to stop."""
        while not stopping.is_set():
            with self.lock:
                if not self.has_work():
                    self.lock.wait(timeout=IDLE_HEARTBEAT_S if self.tp else 1.0)
            if stopping.is_set():
                break
            if self.has_work() or self.tp:
                try:
                    self.step()
                except Exception:  # not any client's fault: keep the trace for whoever runs the server, go on
                    traceback.print_exc()
                    for rid in list(self.requests):
                        self._finish(rid, "error")
                    self.pool.forget()  # the failed pass may have left any block half-written
        for rid in list(self.requests):
            self._finish(rid, "cancelled")
        if self.tp:
            collectives.broadcast_object({"kind": "stop", "cancelled": []})

    def follow_forever(self) -> None:
        """The other ranks of a server: run rank 0's plans until it says stop."""
        while self.step() != "stop":
            pass

    def wake(self) -> None:
        """Make serve_forever look at its stop flag now."""
        with self.lock:
            self.lock.notify_all()
