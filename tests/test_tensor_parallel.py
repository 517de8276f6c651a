"""Tensor parallel with real torchrun processes on CPU (gloo) against the single-process model."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from chatglm2.checkpoint import iter_tensors
from chatglm2.config import ChatGLM2Config
from chatglm2.tensor_parallel import join_tensor, part_root
from helpers import assert_torchrun_matches, main_py, process_weights, torchrun
from modeling_chatglm_ascend import ChatGLM2ForCausalLM

pytestmark = pytest.mark.slow  # every test here starts the commands as processes


@pytest.fixture(scope="module")
def split_ckpt(tiny_ckpt, tmp_path_factory) -> Path:
    """A copy of the tiny checkpoint with parts for tp 2 and 4 written inside it, as the reference does."""
    path = tmp_path_factory.mktemp("tp") / "ckpt"
    shutil.copytree(tiny_ckpt, path)
    for tp_size in (2, 4):
        result = process_weights(path, tp_size)
        assert result.returncode == 0, result.stderr
    return path


@pytest.mark.parametrize("tp_size", [2, 4])
def test_split_then_join_reproduces_every_tensor(split_ckpt, tp_size):
    config = ChatGLM2Config.from_dict(json.loads((split_ckpt / "config.json").read_text()))
    parts = [dict(iter_tensors(part_root(split_ckpt, tp_size) / str(rank))) for rank in range(tp_size)]
    original = {name: t for name, t in iter_tensors(split_ckpt) if not name.endswith("inv_freq")}
    assert all(set(part) == set(original) for part in parts)
    for name, tensor in original.items():
        assert torch.equal(join_tensor(name, [part[name] for part in parts], config), tensor), name


@pytest.mark.parametrize("tp_size", [2, 4])
def test_torchrun_matches_single_process(split_ckpt, tp_size, tmp_path):
    model = ChatGLM2ForCausalLM.from_pretrained(split_ckpt, device="cpu", dtype=torch.float32)
    assert_torchrun_matches(model, split_ckpt, tp_size, tmp_path)


def test_main_modes_under_torchrun_print_once_and_match_tp1(split_ckpt):
    single = main_py("--mode", "precision_single", "--model_path", str(split_ckpt), "--batch", "2", "--dtype", "fp32",
                     MAX_SEQ_LEN="160")
    assert single.returncode == 0, single.stderr
    parallel = torchrun(2, "main.py", "--mode", "precision_single", "--model_path", str(split_ckpt), "--batch", "2",
                        "--dtype", "fp32", "--tp_size", "2", MAX_SEQ_LEN="160")
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    answers = [line for line in parallel.stdout.splitlines() if line.startswith("[batch")]
    assert answers == [line for line in single.stdout.splitlines() if line.startswith("[batch")]
    assert len(answers) == 2

    chat = torchrun(2, "main.py", "--mode", "cli_demo", "--model_path", str(split_ckpt), "--tp_size", "2",
                    stdin="你好\n讲个故事\nclear\n再见\n", MAX_SEQ_LEN="200")
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert chat.stdout.count("ChatGLM：") == 3


def test_tp_size_must_match_torchrun(split_ckpt):
    result = torchrun(2, "main.py", "--mode", "precision_single", "--model_path", str(split_ckpt), "--tp_size", "4")
    assert result.returncode != 0
    assert result.stderr.count("error: --tp_size 4 does not match the 2 process(es)") == 1


def test_missing_and_stale_parts_are_refused(split_ckpt, tmp_path):
    missing = torchrun(2, "main.py", "--mode", "precision_single", "--model_path", str(tmp_path / "nothing"),
                       "--tp_size", "2")
    assert missing.returncode != 0 and "does not exist" in missing.stderr

    copy = tmp_path / "copy"
    shutil.copytree(split_ckpt, copy)
    shutil.rmtree(part_root(copy, 2) / "1")
    result = torchrun(2, "main.py", "--mode", "precision_single", "--model_path", str(copy), "--tp_size", "2")
    assert result.returncode != 0 and result.stderr.count("part_model/1 is missing") == 1

    process_weights(copy, 2)
    shard = sorted(copy.glob("pytorch_model-*.bin"))[0]
    tensors = torch.load(shard, weights_only=True)
    tensors["transformer.embedding.word_embeddings.weight"][0, 0] += 1  # other weights, same size
    torch.save(tensors, shard)
    result = torchrun(2, "main.py", "--mode", "precision_single", "--model_path", str(copy), "--tp_size", "2")
    assert result.returncode != 0
    assert result.stderr.count("was cut from other weights") == 1 and "process_weights.py" in result.stderr


def test_a_copy_of_a_checkpoint_with_its_parts_loads(split_ckpt, tmp_path):
    subprocess.run(["cp", "-r", str(split_ckpt), str(tmp_path / "copy")], check=True)  # new modification times
    result = torchrun(2, "main.py", "--mode", "precision_single", "--model_path", str(tmp_path / "copy"), "--tp_size",
                      "2", MAX_SEQ_LEN="120")
    assert result.returncode == 0, result.stderr[-3000:]


def test_process_weights_refuses_a_tp_size_that_does_not_divide(tiny_ckpt):
    result = process_weights(tiny_ckpt, 3)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --tp_size 3 does not divide")
    assert not (tiny_ckpt / "tensor_parallel_tp3").exists()


def test_process_weights_output_path_is_a_loadable_model_path(tiny_ckpt, tmp_path):
    result = process_weights(tiny_ckpt, 2, "--output_path", str(tmp_path / "tp"))
    assert result.returncode == 0, result.stderr
    run = torchrun(2, "main.py", "--mode", "precision_single", "--model_path", str(tmp_path / "tp"), "--tp_size", "2",
                   MAX_SEQ_LEN="120")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[batch 0]" in run.stdout
