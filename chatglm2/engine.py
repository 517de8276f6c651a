"""The continuous-batching engine that every mode, the web demo and the OpenAI server run on.

A fixed number of slots (max_batch), each a row of the model's preallocated KV cache. Each iteration either admits
waiting requests into free slots (one prefill of their prompts) or runs one decode step for every active slot; a
finished or cancelled request frees its slot at once, and the next waiting one takes it. A request's greedy answer
does not depend on what else is running: each row attends only to its own cache row.

With max_prefill_tokens, a prefill takes at most that many prompt tokens (a long prompt goes in chunks, each
continuing its cache row), and while any request is decoding, prefills and decode steps take turns: a long prompt
arriving delays the tokens of the others by one chunk's time at most, not by its whole prefill.

Under tensor parallel, rank 0 schedules. Each iteration it broadcasts the plan (admissions with their prompt ids, or
the decode rows with their tokens and positions, and the cancellations), every rank runs the same forward pass, and
rank 0 broadcasts the sampled tokens and finished requests, so requests submitted on every rank (generate) end alike
on every rank, and a server's other ranks just follow.
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
    eos_token_id: int | None = None  # None: the model's
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
        self.slot: int | None = None
        self.prefilled = 0  # prompt tokens in the KV cache so far
        self.generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Stop answering; the slot is freed at the start of the next iteration."""
        self.cancelled.set()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefill_done(self) -> bool:
        return self.prefilled == len(self.prompt_ids)

    def stream(self) -> Iterator[int]:
        """The new token ids as they come (for a consumer in another thread than the engine's)."""
        while (token := self.updates.get()) is not None:
            yield token

    def _put(self, item: int | None) -> None:
        self.updates.put(item)
        if self.on_update:
            self.on_update()


def decode_position(request: Request | None) -> int:
    """Where a decode step writes a cache row's key: after its last token; for a free row 0; for a row whose prompt
    is still being prefilled, the position its next chunk overwrites (a decode step writes every row it spans)."""
    if request is None:
        return 0
    if not request.prefill_done:
        return request.prefilled
    return len(request.prompt_ids) + len(request.tokens) - 1


class Engine:
    def __init__(self, model, max_batch: int, tokenizer=None, max_waiting: int | None = None,
                 max_prefill_tokens: int | None = None):
        if max_batch < 1:
            raise InputError(f"the number of slots must be at least 1, got {max_batch}")
        if max_prefill_tokens is not None and max_prefill_tokens < 1:
            raise InputError(f"max_prefill_tokens must be at least 1, got {max_prefill_tokens}")
        model.allocate_kv_cache(max_batch)
        self.model, self.max_batch, self.tokenizer, self.max_waiting = model, max_batch, tokenizer, max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        self.last_plan = "idle"
        self.slots: list[Request | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self.requests: dict[int, Request] = {}  # every unfinished request known on this rank
        self.ids = itertools.count()
        self.lock = threading.Condition()
        self.rank0, self.tp = collectives.is_rank0(), collectives.is_tp()
        self.finished_count: Counter[str] = Counter()  # finish reasons so far, for a server's /health

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
        return bool(self.waiting) or any(self.slots)

    def stats(self) -> dict:
        return {"slots": self.max_batch, "active": sum(r is not None for r in self.slots),
                "waiting": len(self.waiting), "finished": dict(self.finished_count)}

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
        for rid, token in result["tokens"].items():
            if rid in self.requests:
                self.requests[rid].tokens.append(token)
                self.requests[rid]._put(token)
        for rid, reason in result["finished"].items():
            self._finish(rid, reason)
        return plan["kind"]

    def _plan(self) -> dict:
        """Rank 0: drop cancelled requests and admit waiting ones into free slots; then prefill the prompts not yet in
        the cache (oldest first, up to max_prefill_tokens), unless the last iteration was a prefill and some request
        is decoding; else decode every decoding slot."""
        with self.lock:
            cancelled = [r.id for r in [*self.waiting, *filter(None, self.slots)] if r.cancelled.is_set()]
            self.waiting = deque(r for r in self.waiting if not r.cancelled.is_set())
            self.slots = [None if r is not None and r.cancelled.is_set() else r for r in self.slots]
            free = [slot for slot, r in enumerate(self.slots) if r is None]
            admitted = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
        for request, slot in zip(admitted, free):
            request.slot, self.slots[slot] = slot, request
            if request.params.do_sample:
                seed = random.randrange(2 ** 63) if request.params.seed is None else request.params.seed
                request.generator = torch.Generator(self.model.device).manual_seed(seed)
        pending = sorted((r for r in self.slots if r is not None and not r.prefill_done), key=lambda r: r.id)
        decoding = any(r is not None and r.prefill_done for r in self.slots)
        if pending and not (decoding and self.last_plan == "prefill"):
            self.last_plan = "prefill"
            return self._prefill_plan(pending, cancelled)
        occupied = [slot for slot, r in enumerate(self.slots) if r is not None]
        if not decoding:
            self.last_plan = "idle"
            return {"kind": "idle", "cancelled": cancelled}
        self.last_plan = "decode"
        rows = self.slots[:occupied[-1] + 1]
        ready = [r if r is not None and r.prefill_done else None for r in rows]
        positions = [decode_position(r) for r in rows]
        return {"kind": "decode", "cancelled": cancelled, "rids": [r.id if r else None for r in ready],
                "tokens": [r.tokens[-1] if r else 0 for r in ready], "positions": positions,
                "uniform": all(ready) and len(set(positions)) == 1}

    def _prefill_plan(self, pending: list[Request], cancelled: list[int]) -> dict:
        """The next chunk of each pending prompt, within max_prefill_tokens; only the rows whose prompt it completes
        are sampled (their rid is set)."""
        budget = self.max_prefill_tokens or sum(len(r.prompt_ids) for r in pending)
        chunks = []
        for request in pending:
            if budget == 0:
                break
            take = min(len(request.prompt_ids) - request.prefilled, budget)
            chunks.append((request, request.prefilled, take))
            request.prefilled += take
            budget -= take
        return {"kind": "prefill", "cancelled": cancelled,
                "rids": [r.id if r.prefill_done else None for r, _, _ in chunks],
                "rows": [r.slot for r, _, _ in chunks], "starts": [start for _, start, _ in chunks],
                "prompts": [r.prompt_ids[start:start + take] for r, start, take in chunks]}

    def _forward(self, plan: dict) -> torch.Tensor:
        if plan["kind"] == "prefill":
            return self.model.prefill(plan["prompts"], plan["rows"], plan["starts"])
        device = self.model.device
        tokens = torch.tensor(plan["tokens"], device=device)
        positions = torch.tensor(plan["positions"], device=device)
        return self.model.decode(tokens, positions, max(plan["positions"]) + 1, not plan["uniform"])

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
        eos = self.model.config.eos_token_id if params.eos_token_id is None else params.eos_token_id
        if token == eos and not params.ignore_eos:
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
            if request.slot is not None and self.slots[request.slot] is request:
                self.slots[request.slot] = None
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
