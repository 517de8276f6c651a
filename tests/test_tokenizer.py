"""The ChatGLM2 tokenizer's behaviour on a real SentencePiece model trained from the repo's corpus."""
import torch

from modeling_chatglm_ascend import ChatGLM2Tokenizer


def test_special_tokens_follow_the_sentencepiece_vocabulary(tiny_ckpt):
    tokenizer = ChatGLM2Tokenizer.from_pretrained(tiny_ckpt)
    n = tokenizer.sp.vocab_size()
    assert [tokenizer.get_command(t) for t in ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")] == list(range(n, n + 5))
    assert tokenizer.vocab_size == n + 5
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


def test_encode_prefixes_gmask_sop_and_decode_round_trips(tiny_ckpt):
    tokenizer = ChatGLM2Tokenizer.from_pretrained(tiny_ckpt)
    text = "[Round 1]\n\n问：你好，请问 3+4=?\n\n答：7"
    ids = tokenizer.encode(text)
    assert ids[:2] == [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    assert ids[2:] == tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids + [tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.get_command("eop")]) == text


def test_build_prompt_matches_chatglm2_format():
    history = [("你好", "你好！"), ("1+1", "2")]
    assert ChatGLM2Tokenizer.build_prompt("再见", history) == (
        "[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：1+1\n\n答：2\n\n[Round 3]\n\n问：再见\n\n答：")
    assert ChatGLM2Tokenizer.build_prompt("hi") == "[Round 1]\n\n问：hi\n\n答："


def test_batch_is_left_padded_with_attention_mask(tiny_ckpt):
    tokenizer = ChatGLM2Tokenizer.from_pretrained(tiny_ckpt)
    batch = tokenizer(["你好", "今天天气怎么样？"])
    short, long = tokenizer.encode("你好"), tokenizer.encode("今天天气怎么样？")
    width = len(long)
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (2, width)
    assert batch["input_ids"][0].tolist() == [0] * (width - len(short)) + short
    assert batch["attention_mask"][0].tolist() == [0] * (width - len(short)) + [1] * len(short)
    assert batch["attention_mask"][1].tolist() == [1] * width
