"""Our model against transformers' GlmForCausalLM on the same random checkpoint (fp32)."""
import pytest
import torch

from helpers import PROMPTS
from modeling_chatglm_ascend import ChatGLM2ForCausalLM, ChatGLM2Tokenizer
from reference_glm import glm_reference


@pytest.fixture(params=["bin", "safetensors"])
def ckpt(request, tiny_ckpt, tiny_ckpt_safetensors):
    return tiny_ckpt if request.param == "bin" else tiny_ckpt_safetensors


def test_logits_match_reference_for_left_padded_batch(ckpt):
    tokenizer = ChatGLM2Tokenizer.from_pretrained(ckpt)
    ours = ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu", dtype=torch.float32)
    reference = glm_reference(ckpt)
    batch = tokenizer(PROMPTS)
    mask = batch["attention_mask"]
    assert len(set(mask.sum(-1).tolist())) > 1, "prompts must differ in length"
    logits = ours(**batch)
    with torch.no_grad():
        expected = reference(input_ids=batch["input_ids"], attention_mask=mask,
                             position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    real = mask.bool()
    assert (logits[real] - expected[real]).abs().max().item() <= 1e-4


def test_greedy_tokens_match_reference(ckpt):
    tokenizer = ChatGLM2Tokenizer.from_pretrained(ckpt)
    ours = ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu", dtype=torch.float32)
    reference = glm_reference(ckpt)
    batch = tokenizer(PROMPTS)
    new_tokens = 16
    output = ours.generate(**batch, max_new_tokens=new_tokens)
    with torch.no_grad():
        expected = reference.generate(**batch, max_new_tokens=new_tokens, do_sample=False, eos_token_id=2,
                                      pad_token_id=0)[:, batch["input_ids"].shape[1]:]
    assert torch.equal(output, expected)


def test_each_row_of_a_batch_equals_the_row_alone(tiny_ckpt):
    tokenizer = ChatGLM2Tokenizer.from_pretrained(tiny_ckpt)
    model = ChatGLM2ForCausalLM.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32)
    batched = model.generate(**tokenizer(PROMPTS), max_new_tokens=12)
    for row, prompt in enumerate(PROMPTS):
        alone = model.generate(**tokenizer(prompt), max_new_tokens=12)[0]
        assert torch.equal(batched[row, :len(alone)], alone)


def test_bf16_greedy_is_stable_and_close_to_fp32(tiny_ckpt):
    tokenizer = ChatGLM2Tokenizer.from_pretrained(tiny_ckpt)
    model = ChatGLM2ForCausalLM.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.bfloat16)
    batch = tokenizer(PROMPTS)
    first = model.generate(**batch, max_new_tokens=12)
    assert torch.equal(first, model.generate(**batch, max_new_tokens=12))
    fp32 = ChatGLM2ForCausalLM.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32)
    cosine = torch.nn.functional.cosine_similarity(model(**batch)[:, -1], fp32(**batch)[:, -1], dim=-1)
    assert cosine.min().item() > 0.99
