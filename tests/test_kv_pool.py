"""The paged KV pool: block bookkeeping, prefix reuse, preemption, and answers equal to the unpaged reference."""
import random

import pytest
import torch

from chatglm2.engine import Engine, SamplingParams
from chatglm2.kv_pool import BLOCK_SIZE, BlockPool, block_hashes
from chatglm2.model import PREFILL_SIZES
from helpers import PROMPTS, pool_workload
from modeling_chatglm_ascend import ChatGLM2ForCausalLM, ChatGLM2Tokenizer


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_ckpt):
    return (ChatGLM2ForCausalLM.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32, max_seq_len=256),
            ChatGLM2Tokenizer.from_pretrained(tiny_ckpt))


def reference(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens from the scoring pass over the whole sequence at every step: no KV cache at all."""
    sequence = list(prompt_ids)
    for _ in range(max_new_tokens):
        sequence.append(int(model(torch.tensor([sequence]), last_logit_only=True)[0, -1].argmax()))
    return sequence[len(prompt_ids):]


def answers(engine: Engine, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    requests = [engine.submit(ids, SamplingParams(max_new_tokens=max_new_tokens)) for ids in prompts]
    while not all(r.finished for r in requests):
        engine.step()
    return [r.tokens for r in requests]


def assert_no_block_held(pool: BlockPool) -> None:
    assert not any(pool.refs) and len(pool.free) + len(pool.cached) == pool.num_blocks - 1
    assert set(pool.cached) == set(pool.hash_of) == set(pool.block_of.values())


def test_block_hashes_chain_every_token_before():
    tokens = list(range(3 * BLOCK_SIZE + 5))
    hashes = block_hashes(tokens)
    assert len(hashes) == 3 and block_hashes(tokens[:BLOCK_SIZE * 2]) == hashes[:2]
    assert block_hashes(tokens, hashes[:1]) == hashes  # continues from the blocks already hashed
    changed = block_hashes([99] + tokens[1:])
    assert all(a != b for a, b in zip(changed, hashes))  # a different first token changes every later block


def test_pool_reference_counts_and_least_recently_used_eviction():
    pool = BlockPool(4)  # three usable blocks
    first, second = pool.take(2), pool.take(1)
    assert pool.available() == 0 and 0 not in first + second
    hashes = [b"a", b"b"]
    for block, block_hash in zip(first, hashes):
        pool.register(block, block_hash)
    assert pool.match(hashes) == first  # shared: now held twice
    pool.release(first)
    assert pool.available() == 0  # still held once
    pool.release(first)
    assert list(pool.cached) == first[::-1] and pool.available() == 2
    pool.release(second)  # never hashed: straight back to free
    assert pool.free == second
    assert pool.take(2) == [second[0], first[1]]  # the free block first, then the least recent, the chain's tail
    assert pool.match(hashes) == [first[0]]  # the chain's head is still found


def test_paged_answers_equal_the_unpaged_reference(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer.encode(tokenizer.build_prompt(p)) for p in PROMPTS]
    prompts[1] = prompts[1] * 3  # over several blocks
    expected = [reference(model, ids, 20) for ids in prompts]
    assert answers(Engine(model, 4, prefix_caching=False), prompts, 20) == expected


def test_a_prefix_hit_gives_the_cold_answer_and_prefills_only_the_rest(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    system = tokenizer.encode(PROMPTS[1] * 4)  # a shared preamble of several blocks
    prompts = [system + tokenizer.encode(tokenizer.build_prompt(p), add_special_tokens=False) for p in PROMPTS]
    cold = answers(Engine(model, 2, prefix_caching=False), prompts, 12)
    engine = Engine(model, 2, max_prefill_tokens=20)  # chunked too
    assert answers(engine, prompts[:1], 12) == cold[:1]
    requests = [engine.submit(ids, SamplingParams(max_new_tokens=12)) for ids in prompts[1:]]
    while not all(r.finished for r in requests):
        engine.step()
    assert [r.tokens for r in requests] == cold[1:]
    assert all(r.cached_tokens == len(system) // BLOCK_SIZE * BLOCK_SIZE for r in requests)
    # a prompt entirely in the cache still computes its last token, whose logits give the answer
    assert answers(engine, prompts[:1], 12) == cold[:1]
    assert_no_block_held(engine.pool)


def test_the_next_chat_turn_reuses_the_conversation(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    eos, history, previous_prompt = tokenizer.eos_token_id, [], []
    pool = Engine(model, 1).pool  # the pool chat's batch of one keeps between calls
    for turn, query in enumerate(PROMPTS[:3]):
        hits = pool.hit_tokens
        max_length = 60 * (turn + 1)  # the random model seldom stops: leave room for the next turn
        response, history = model.chat(tokenizer, query, history, do_sample=False, max_length=max_length)
        prompt_ids = tokenizer.encode(tokenizer.build_prompt(query, history[:-1]))
        cold = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_length - len(prompt_ids),
                              prefix_caching=False)[0].tolist()
        assert response == tokenizer.decode(cold[:cold.index(eos)] if eos in cold else cold).strip()
        # the last turn's prompt was found in the cache, but for the block where the two may tokenize apart
        assert model.kv_blocks is pool and pool.hit_tokens - hits >= (len(previous_prompt) // BLOCK_SIZE - 1) * BLOCK_SIZE
        previous_prompt = prompt_ids


def test_preemption_in_a_small_pool_changes_no_answer(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    expected = [reference(model, tokenizer.encode(tokenizer.build_prompt(p)) * k, 12) for k in (1, 2) for p in PROMPTS]
    tokens, preemptions = pool_workload(model, tokenizer)
    assert tokens == expected and preemptions > 0
    engine = Engine(model, 2, kv_cache_tokens=40)
    sampled = [SamplingParams(max_new_tokens=24, do_sample=True, temperature=1.5, seed=seed) for seed in (1, 2)]
    requests = [engine.submit(tokenizer.encode(p), params) for p, params in zip(PROMPTS[1:], sampled)]
    while not all(r.finished for r in requests):
        engine.step()
    assert engine.preemptions > 0
    for request, params in zip(requests, sampled):  # a sampled answer keeps its generator through preemption
        alone = Engine(model, 1)
        again = alone.submit(request.prompt_ids, params)
        while not again.finished:
            alone.step()
        assert again.tokens == request.tokens


def test_prefill_passes_take_a_few_shapes_whatever_the_prompt_lengths(model_and_tokenizer):
    """Issue 23: a CPU keeps oneDNN kernels and buffers per input shape, so the linear layers must see a bounded set
    of shapes however the prompts vary; prompts cut between passes keep their answers."""
    model, tokenizer = model_and_tokenizer
    text = tokenizer.encode(" ".join(PROMPTS) * 20)
    prompts = [text[i:i + length] for i, length in enumerate(range(3, 200, 5))]  # 40 lengths, 4 admitted at once
    shapes = set()
    layer = model.transformer.encoder.layers[0].self_attention.query_key_value
    hook = layer.register_forward_hook(lambda module, inputs, output: shapes.add(tuple(inputs[0].shape[:2])))
    try:
        tokens = answers(Engine(model, 4), prompts, 3)
    finally:
        hook.remove()
    assert {shape for shape in shapes if shape[1] > 1} <= {(1, size) for size in PREFILL_SIZES}
    assert {shape for shape in shapes if shape[1] == 1} <= {(rows, 1) for rows in range(1, 5)}
    assert tokens == [reference(model, ids, 3) for ids in prompts]


def test_a_request_larger_than_the_pool_is_refused(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, 1, kv_cache_tokens=32)
    with pytest.raises(Exception, match="needs more than the KV cache's 32 tokens; shorten it or raise --kv_cache_tokens"):
        engine.submit(list(range(20)), SamplingParams(max_new_tokens=14))
    engine.submit(list(range(20)), SamplingParams(max_new_tokens=13))


def test_a_soak_of_random_requests_leaves_no_block_held(model_and_tokenizer):
    """Hundreds of requests sharing prefixes, some cancelled while waiting or running, in a pool that preempts."""
    model, tokenizer = model_and_tokenizer
    rng = random.Random(0)
    preambles = [tokenizer.encode(p * 3) for p in PROMPTS]
    engine = Engine(model, 6, max_prefill_tokens=48, kv_cache_tokens=320)
    requests = []
    for i in range(300):
        ids = rng.choice(preambles)[:rng.randrange(1, 60)] + [rng.randrange(5, 1000) for _ in range(rng.randrange(6))]
        requests.append(engine.submit(ids or [5], SamplingParams(max_new_tokens=rng.randrange(1, 40),
                                                                 do_sample=rng.random() < 0.3, seed=i)))
        if rng.random() < 0.1:
            rng.choice(requests).cancel()
        if rng.random() < 0.5:
            engine.step()
    while engine.has_work():
        engine.step()
    assert all(r.finished for r in requests) and engine.preemptions > 0 and engine.pool.hit_tokens > 0
    assert {r.finish_reason for r in requests} == {"length", "cancelled"} or \
        {r.finish_reason for r in requests} == {"length", "cancelled", "stop"}
    assert_no_block_held(engine.pool)
    probe = tokenizer.encode(tokenizer.build_prompt(PROMPTS[0]))
    assert answers(engine, [probe], 12) == [reference(model, probe, 12)]
