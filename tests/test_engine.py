"""The continuous-batching engine: slots, admission, cancellation, per-request settings, batch invariance."""
import pytest
import torch

from chatglm2.engine import Engine, EngineFull, SamplingParams
from chatglm2.errors import InputError
from helpers import PROMPTS
from modeling_chatglm_ascend import ChatGLM2ForCausalLM, ChatGLM2Tokenizer


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_ckpt):
    return (ChatGLM2ForCausalLM.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32, max_seq_len=160),
            ChatGLM2Tokenizer.from_pretrained(tiny_ckpt))


def run_until_done(engine: Engine, requests: list) -> None:
    while not all(r.finished for r in requests):
        engine.step()


def alone(model, prompt_ids: list[int], params: SamplingParams) -> list[int]:
    engine = Engine(model, 1)
    request = engine.submit(prompt_ids, params)
    run_until_done(engine, [request])
    return request.tokens


def test_greedy_answers_do_not_depend_on_what_else_runs(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer.encode(tokenizer.build_prompt(p)) for p in PROMPTS + ["讲个笑话", "What is 2+2?"]]
    budgets = [5, 12, 3, 9, 7, 11]
    expected = [alone(model, ids, SamplingParams(max_new_tokens=n)) for ids, n in zip(prompts, budgets)]
    engine = Engine(model, 3)
    requests = [engine.submit(ids, SamplingParams(max_new_tokens=n)) for ids, n in zip(prompts[:4], budgets[:4])]
    for _ in range(2):  # the others join while these decode, and take the slots that free up
        engine.step()
    assert sum(r is not None for r in engine.slots) == 3 and len(engine.waiting) == 1
    requests += [engine.submit(ids, SamplingParams(max_new_tokens=n)) for ids, n in zip(prompts[4:], budgets[4:])]
    run_until_done(engine, requests)
    assert [r.tokens for r in requests] == expected
    assert [r.finish_reason for r in requests] == ["length"] * 6
    assert not any(engine.slots) and not engine.waiting and not engine.requests


def test_cancel_frees_the_slot_for_the_next_request(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, 1)
    first = engine.submit(tokenizer.encode("你好"), SamplingParams(max_new_tokens=50))
    second = engine.submit(tokenizer.encode("再见"), SamplingParams(max_new_tokens=4))
    engine.step()
    engine.step()
    assert engine.slots[0] is first and len(first.tokens) == 2
    first.cancel()
    assert engine.step() == "prefill" and engine.slots[0] is second
    assert first.finish_reason == "cancelled" and list(first.stream()) == first.tokens
    run_until_done(engine, [second])
    assert second.tokens == alone(model, tokenizer.encode("再见"), SamplingParams(max_new_tokens=4))


def test_eos_stop_strings_and_sampling_settings_per_request(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("Write a poem")
    free = alone(model, prompt, SamplingParams(max_new_tokens=8))
    engine = Engine(model, 4, tokenizer)
    eos = engine.submit(prompt, SamplingParams(max_new_tokens=8, eos_token_id=free[2]))
    stop_text = tokenizer.decode(free[:4])[-2:]
    stop = engine.submit(prompt, SamplingParams(max_new_tokens=8, stop=(stop_text,)))
    top_k_1 = engine.submit(prompt, SamplingParams(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=1))
    sampled = [engine.submit(prompt, SamplingParams(max_new_tokens=8, do_sample=True, temperature=1.3, seed=seed))
               for seed in (7, 7, 8)]
    run_until_done(engine, [eos, stop, top_k_1, *sampled])
    assert eos.tokens == free[:3] and eos.finish_reason == "stop"
    assert stop.finish_reason == "stop" and stop_text in tokenizer.decode(stop.tokens) and len(stop.tokens) <= 4
    assert top_k_1.tokens == free
    assert sampled[0].tokens == sampled[1].tokens != sampled[2].tokens


def test_bad_requests_are_refused_and_the_queue_is_bounded(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, 1, max_waiting=2)
    with pytest.raises(InputError, match="exceeds MAX_SEQ_LEN=160"):
        engine.submit(tokenizer.encode("你好"), SamplingParams(max_new_tokens=200))
    with pytest.raises(InputError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(InputError, match="stop strings need"):
        engine.submit(tokenizer.encode("你好"), SamplingParams(max_new_tokens=2, stop=("x",)))
    engine.submit(tokenizer.encode("你好"), SamplingParams(max_new_tokens=2))
    engine.submit(tokenizer.encode("你好"), SamplingParams(max_new_tokens=2))
    with pytest.raises(EngineFull):
        engine.submit(tokenizer.encode("你好"), SamplingParams(max_new_tokens=2))


def test_the_kv_cache_is_checked_against_free_memory(model_and_tokenizer):
    model, _ = model_and_tokenizer
    with pytest.raises(InputError, match=r"KV cache of 100000000 sequence\(s\).*needs .* GiB but only"):
        Engine(model, 100_000_000)
