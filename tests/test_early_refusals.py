"""Issue 20 item 3: a refusal that needs only the flags, the environment and config.json comes before any weight is
read or any input built. Each case runs on a checkpoint whose weight shards are cut short: had loading started, the
error would be "may be truncated" instead."""
import json
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

from chatglm2.checkpoint import read_config
from chatglm2.config import ChatGLM2Config
from chatglm2.errors import InputError
from chatglm2.memory import kv_cache_bytes
from helpers import assert_one_line_error, main_py, run
from modeling_chatglm_ascend import ChatGLM2ForCausalLM

LOADING_ERROR = "may be truncated"


@pytest.fixture(scope="module")
def cut_ckpt(tiny_ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint with every weight shard cut to its first KiB (config.json and tokenizer intact)."""
    path = tmp_path_factory.mktemp("cut") / "ckpt"
    shutil.copytree(tiny_ckpt, path)
    for shard in path.glob("pytorch_model-*.bin"):
        shard.write_bytes(shard.read_bytes()[:1024])
    return path


def ceval_dataset(root: Path) -> Path:
    (root / "val" / "STEM").mkdir(parents=True)
    line = json.dumps({"inputs_pretokenized": "1+1=?\nA. 1\nB. 2\nC. 3\nD. 4", "label": 1})
    (root / "val" / "STEM" / "logic.jsonl").write_text(line + "\n", encoding="utf-8")
    return root


@pytest.mark.slow
def test_loading_the_cut_checkpoint_fails_with_another_error(cut_ckpt):
    """The control: with nothing to refuse first, the cut shards are what stops the run."""
    assert_one_line_error(main_py("--mode", "precision_single", "--model_path", str(cut_ckpt), MAX_SEQ_LEN="100"),
                          LOADING_ERROR)


@pytest.mark.slow
def test_a_kv_cache_too_large_is_refused_in_seconds(tiny_ckpt):
    """The case of the issue: 83 s of building 2,000,000 inputs before this refusal; now the torch import dominates."""
    start = time.monotonic()
    result = main_py("--mode", "precision_single", "--model_path", str(tiny_ckpt), "--batch", "2000000", timeout=120)
    elapsed = time.monotonic() - start
    assert_one_line_error(result, "the KV cache of 4096000000 tokens needs",
                          "--batch")
    assert "loaded" not in result.stdout and "loading weights" not in result.stderr
    assert elapsed < 30, f"the refusal took {elapsed:.1f} s"  # generous: a shared 2-core machine; ~3 s when idle


@pytest.mark.slow
@pytest.mark.parametrize("case", ["batch", "cli_demo MAX_SEQ_LEN", "single MAX_SEQ_LEN", "performance output"])
def test_main_modes_refuse_before_loading(cut_ckpt, tmp_path, case):
    model = ("--model_path", str(cut_ckpt))
    if case == "batch":
        result, fragment = main_py("--mode", "precision_single", *model, "--batch", "2000000"), "KV cache of 4096000000 tokens"
    elif case == "cli_demo MAX_SEQ_LEN":
        result = main_py("--mode", "cli_demo", *model, stdin="你好\n", MAX_SEQ_LEN="10000000000")
        fragment = "KV cache of 10000000000 tokens"
    elif case == "single MAX_SEQ_LEN":
        result, fragment = main_py("--mode", "precision_single", *model, MAX_SEQ_LEN="20"), "leaves no room to answer"
    else:
        (tmp_path / "perf.csv").mkdir()
        result = main_py("--mode", "performance", *model, "--seqlen_in_pair", "8", "--seqlen_out_pair", "3",
                         "--performance_output_file", str(tmp_path / "perf.csv"))
        fragment = "is not a file"
    assert_one_line_error(result, fragment)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no dataset", "output clash", "output not JSON", "question too long"])
def test_ceval_refuses_before_loading(cut_ckpt, tmp_path, case):
    dataset, output, env = ceval_dataset(tmp_path / "CEval"), tmp_path / "res.json", {"MAX_SEQ_LEN": "200"}
    if case == "no dataset":
        dataset, fragment = tmp_path / "nowhere", "does not exist"
    elif case == "output clash":
        output, fragment = tmp_path / "res.csv", "ends in .csv"
    elif case == "output not JSON":
        output.write_text("not json")
        fragment = "is not JSON"
    else:
        env, fragment = {"MAX_SEQ_LEN": "30"}, "leaves no room to answer under MAX_SEQ_LEN=30"
    result = main_py("--mode", "precision_dataset", "--model_path", str(cut_ckpt), "--ceval_dataset", str(dataset),
                     "--precision_output_file", str(output), **env)
    assert_one_line_error(result, fragment)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["web_demo.py", "openai_api.py"])
def test_servers_refuse_before_loading(cut_ckpt, command):
    server = (command, "--model_path", str(cut_ckpt))
    assert_one_line_error(run(*server, "--max_batch", "1000000"), "KV cache of 2048000000 tokens", "--max_batch")
    assert_one_line_error(run(*server, "--kv_cache_tokens", "2048000000"), "KV cache of 2048000000 tokens",
                          "--kv_cache_tokens")
    assert_one_line_error(run(*server, "--kv_cache_memory", "1.5"), "'1.5' is not a fraction in (0, 1]")
    assert_one_line_error(run(*server, KV_CACHE_TOKENS="lots"), "KV_CACHE_TOKENS='lots' is not a positive integer")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert_one_line_error(run(*server, "--server_port", str(taken.getsockname()[1])), "cannot listen")


def test_from_pretrained_checks_weights_and_kv_cache_together_before_reading(cut_ckpt, monkeypatch):
    """Free memory for the KV cache of 4 sequences but not for the weights too: refused, and before the cut shards
    are read."""
    config = ChatGLM2Config.from_dict(read_config(cut_ckpt))
    cache = kv_cache_bytes(config, 4 * 128, 1, torch.float32)
    monkeypatch.setattr("chatglm2.memory.available_bytes", lambda device: cache + 1)
    load = dict(device="cpu", dtype=torch.float32, max_seq_len=128, kv_cache_tokens=4 * 128)
    with pytest.raises(InputError, match=r"the model \(weights at least .* the KV cache of 512 tokens"):
        ChatGLM2ForCausalLM.from_pretrained(cut_ckpt, **load)
    monkeypatch.setattr("chatglm2.memory.available_bytes", lambda device: cache - 1)
    with pytest.raises(InputError, match=r"^the KV cache of 512 tokens needs"):
        ChatGLM2ForCausalLM.from_pretrained(cut_ckpt, **load)


def test_the_kv_cache_estimate_is_what_is_allocated(tiny_ckpt):
    model = ChatGLM2ForCausalLM.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32, max_seq_len=64)
    model.allocate_kv_cache(3 * 64, 3)
    assert sum(t.numel() * t.element_size() for pair in model.kv_cache for t in pair) == \
        kv_cache_bytes(model.config, 3 * 64, 1, torch.float32)
