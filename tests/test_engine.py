"""The continuous-batching engine: admission, cancellation, per-request settings, batch invariance."""
import pytest
import torch

from chatglm2.engine import Engine, EngineFull, SamplingParams
from chatglm2.errors import InputError
from chatglm2.kv_pool import blocks_for
from chatglm2.model import pool_slots
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
    engine = Engine(model, 1, prefix_caching=False)
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
    assert len(engine.running) == 3 and len(engine.waiting) == 1
    requests += [engine.submit(ids, SamplingParams(max_new_tokens=n)) for ids, n in zip(prompts[4:], budgets[4:])]
    run_until_done(engine, requests)
    assert [r.tokens for r in requests] == expected
    assert [r.finish_reason for r in requests] == ["length"] * 6
    assert not engine.running and not engine.waiting and not engine.requests


def test_cancel_frees_the_slot_for_the_next_request(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, 1)
    first = engine.submit(tokenizer.encode("你好"), SamplingParams(max_new_tokens=50))
    second = engine.submit(tokenizer.encode("再见"), SamplingParams(max_new_tokens=4))
    engine.step()
    engine.step()
    assert engine.running == [first] and len(first.tokens) == 2
    first.cancel()
    assert engine.step() == "prefill" and engine.running == [second]
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


def pool_contents(model, blocks: list[int], length: int) -> torch.Tensor:
    """A copy of the keys and values of a sequence's first `length` positions, [layers, K/V, length, groups, head_dim]."""
    slots = pool_slots(torch.tensor([blocks]), torch.arange(length)[None])[0]
    return torch.stack([torch.stack([keys[slots], values[slots]]) for keys, values in model.kv_cache])


def test_a_prompt_prefilled_in_chunks_equals_one_prefill(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    model.allocate_kv_cache(3 * 160, 3)
    pool = model.kv_blocks
    long_ids, short_ids = (tokenizer.encode(tokenizer.build_prompt(p)) for p in PROMPTS[:2])
    long_ids = long_ids * 3  # over three blocks
    assert len(long_ids) > 40 and len(short_ids) > 5
    long_blocks, short_blocks = pool.take(blocks_for(len(long_ids))), pool.take(blocks_for(len(short_ids)))
    whole = model.prefill([long_ids, short_ids], [long_blocks, short_blocks])
    cache = pool_contents(model, long_blocks, len(long_ids)), pool_contents(model, short_blocks, len(short_ids))
    for tensor in (t for pair in model.kv_cache for t in pair):
        tensor.normal_()  # what earlier requests left in the blocks: every position read must be rewritten
    # other blocks, chunks of different lengths in one call (so padded), a first chunk beside a continuation, and a
    # chunk that ends inside a block
    long_again, short_again = pool.take(blocks_for(len(long_ids))), pool.take(blocks_for(len(short_ids)))
    model.prefill([long_ids[:5]], [long_again])
    model.prefill([long_ids[5:20], short_ids[:3]], [long_again, short_again], [5, 0])
    last = model.prefill([long_ids[20:], short_ids[3:]], [long_again, short_again], [20, 3])
    torch.testing.assert_close(last, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pool_contents(model, long_again, len(long_ids)), cache[0])
    torch.testing.assert_close(pool_contents(model, short_again, len(short_ids)), cache[1])
    pool.release(long_blocks + short_blocks + long_again + short_again)


def test_chunked_prefill_takes_turns_with_decoding_and_changes_no_answer(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer.encode(tokenizer.build_prompt(p)) for p in PROMPTS + ["讲个笑话"]]
    long_prompt = prompts[0] * 3
    settings = [SamplingParams(max_new_tokens=n) for n in (20, 20, 6, 6, 6)]
    expected = [alone(model, ids, params) for ids, params in zip([*prompts[:2], long_prompt, *prompts[2:]], settings)]
    engine = Engine(model, 3, max_prefill_tokens=8)
    requests = [engine.submit(ids, params) for ids, params in zip(prompts[:2], settings)]
    while not all(r.tokens for r in requests):
        engine.step()
    requests.append(engine.submit(long_prompt, settings[2]))
    before, kinds = [len(r.tokens) for r in requests[:2]], []
    while not requests[2].tokens:
        kinds.append(engine.step())
    # the long prompt starts with the first one, whose full block is cached; the rest goes in chunks of 8 tokens,
    # and the two answers get a token before each of them
    assert requests[2].cached_tokens == 16
    chunks = -(-(len(long_prompt) - 16) // 8)
    assert kinds == ["decode", "prefill"] * chunks
    assert [len(r.tokens) - count for r, count in zip(requests, before)] == [chunks] * 2
    requests += [engine.submit(ids, params) for ids, params in zip(prompts[2:], settings[3:])]
    run_until_done(engine, requests)
    assert [r.tokens for r in requests] == expected
    with pytest.raises(InputError, match="max_prefill_tokens must be at least 1"):
        Engine(model, 1, max_prefill_tokens=0)


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
    with pytest.raises(InputError, match=r"KV cache of 16000000000 tokens needs .* GiB but only"):
        Engine(model, 100_000_000)
