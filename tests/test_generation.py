"""Generation: sampling, stopping, the KV cache limit, streaming chat."""
import pytest
import torch

from chatglm2 import ops
from chatglm2.errors import InputError
from chatglm2.sampling import guard_invalid_scores, next_token
from modeling_chatglm_ascend import ChatGLM2ForCausalLM, ChatGLM2Tokenizer


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_ckpt):
    return (ChatGLM2ForCausalLM.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32, max_seq_len=128),
            ChatGLM2Tokenizer.from_pretrained(tiny_ckpt))


def test_incremental_decode_equals_full_forward(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batch = tokenizer(["你好", "今天天气怎么样？请问"])
    output = model.generate(**batch, max_new_tokens=6, ignore_eos=True)
    full_ids = torch.cat([batch["input_ids"], output], dim=1)
    full_mask = torch.cat([batch["attention_mask"], torch.ones_like(output)], dim=1)
    logits = model(full_ids, full_mask)
    prompt_len = batch["input_ids"].shape[1]
    assert torch.equal(logits[:, prompt_len - 1:-1].argmax(-1), output)


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batch = tokenizer(["你好", "Write a poem"])
    sample = dict(max_new_tokens=10, do_sample=True, temperature=1.3, top_p=0.9)
    assert torch.equal(model.generate(**batch, seed=7, **sample), model.generate(**batch, seed=7, **sample))
    assert not torch.equal(model.generate(**batch, seed=7, **sample), model.generate(**batch, seed=8, **sample))
    greedy = model.generate(**batch, max_new_tokens=10)
    assert torch.equal(model.generate(**batch, max_new_tokens=10, do_sample=True, top_k=1, seed=3), greedy)


def test_rows_stop_at_eos_and_are_padded(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batch = tokenizer(["你好", "Write a poem"])
    free = model.generate(**batch, max_new_tokens=8)
    eos = int(free[0, 2])  # pretend row 0's third token is the end of its answer
    stopped = model.generate(**batch, max_new_tokens=8, eos_token_id=eos)
    assert stopped[0, 2] == eos and (stopped[0, 3:] == 0).all()


def test_guard_replaces_nan_rows_like_the_reference():
    logits = torch.tensor([[0.0, 1.0, float("nan"), 0.0, 0.0, 0.0, 0.0], [0.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    guarded = guard_invalid_scores(logits)
    assert guarded[0].tolist() == [0, 0, 0, 0, 0, 5e4, 0]
    assert torch.equal(guarded[1], logits[1])
    assert next_token(logits, do_sample=False).tolist() == [5, 1]


def test_max_seq_len_and_empty_prompts_are_clear_errors(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batch = tokenizer("你好")
    with pytest.raises(InputError, match="exceeds MAX_SEQ_LEN=128"):
        model.generate(**batch, max_new_tokens=200)
    with pytest.raises(InputError, match="empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(InputError, match="message is empty"):
        next(model.stream_chat(tokenizer, "   "))


def test_stream_chat_grows_the_answer_and_the_history(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    steps = list(model.stream_chat(tokenizer, "你好", max_length=60, seed=0))
    responses = [response for response, _ in steps]
    assert len(responses) > 1 and all(b.startswith(a) for a, b in zip(responses, responses[1:]))
    response, history = steps[-1]
    assert history == [("你好", response)]
    again, history2 = model.chat(tokenizer, "再见", history, max_length=100, do_sample=False)
    assert history2[0] == ("你好", response) and history2[1] == ("再见", again)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gpu_decode_attention_equals_sdpa(dtype):
    """ops.decode_attention_matmul is what CUDA runs for one query per head; here it meets SDPA on the CPU."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=generator).to(dtype) for shape in
               ((3, 2, 16, 64), (3, 2, 300, 64), (3, 2, 300, 64)))
    mask = (torch.arange(300)[None, :] <= torch.tensor([5, 299, 120])[:, None])[:, None, None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    torch.testing.assert_close(ops.decode_attention_matmul(q, k, v, mask).float(), expected,
                               rtol=1e-5 if dtype == torch.float32 else 2e-2, atol=1e-5 if dtype == torch.float32 else 2e-2)
    full = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(ops.decode_attention_matmul(q, k, v, None).float(), full,
                               rtol=1e-5 if dtype == torch.float32 else 2e-2, atol=1e-5 if dtype == torch.float32 else 2e-2)
