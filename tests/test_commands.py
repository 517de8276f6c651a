"""main.py as a user runs it: the modes of the core issue and one-line errors for bad input."""
import json
import shutil

import pytest
import torch

from helpers import assert_one_line_error, main_py

pytestmark = pytest.mark.slow  # every test here starts the commands as processes


def test_precision_single_answers_each_batch_row(tiny_ckpt):
    result = main_py("--mode", "precision_single", "--model_path", str(tiny_ckpt), "--batch", "3", MAX_SEQ_LEN="200")
    assert result.returncode == 0, result.stderr
    answers = [line for line in result.stdout.splitlines() if line.startswith("[batch")]
    assert len(answers) == 3 and len(set(line.split("答：", 1)[1] for line in answers)) == 1
    assert "属于我国古代四大发明" in result.stdout


def test_cli_demo_streams_three_turns_and_clear_from_a_pipe(tiny_ckpt):
    result = main_py("--mode", "cli_demo", "--model_path", str(tiny_ckpt), stdin="你好\n讲个笑话\nclear\n再见\n",
                     MAX_SEQ_LEN="400")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ChatGLM：") == 3
    assert result.stdout.count("欢迎使用") == 2  # at start and after clear
    assert result.stdout.rstrip().endswith("用户：")  # end of input stops cleanly


def test_cli_demo_keeps_going_when_the_history_outgrows_max_seq_len(tiny_ckpt):
    result = main_py("--mode", "cli_demo", "--model_path", str(tiny_ckpt), stdin="你好" * 40 + "\nclear\n你好\n",
                     MAX_SEQ_LEN="60")
    assert result.returncode == 0, result.stderr
    assert "leaves no room" in result.stdout and result.stdout.count("ChatGLM：") == 2


@pytest.mark.parametrize("args, fragments", [
    (["--mode", "nonsense"], ["invalid choice: 'nonsense'"]),
    (["--mode", "precision_single", "--batch", "x"], ["--batch", "invalid int value"]),
    (["--mode", "precision_single", "--batch", "0"], ["--batch must be at least 1"]),
    (["--mode", "performance", "--seqlen_in_pair", "256,512", "--seqlen_out_pair", "256"], ["one output length"]),
    (["--mode", "performance", "--seqlen_in_pair", "1024", "--seqlen_out_pair", "1100"], ["MAX_SEQ_LEN=2124"]),
    (["--mode", "precision_dataset"], ["--ceval_dataset"]),
])
def test_bad_flags_give_one_line(tiny_ckpt, args, fragments):
    assert_one_line_error(main_py("--model_path", str(tiny_ckpt), *args), *fragments)


def test_prompt_longer_than_max_seq_len_is_one_line(tiny_ckpt):
    assert_one_line_error(main_py("--mode", "precision_single", "--model_path", str(tiny_ckpt), MAX_SEQ_LEN="20"),
                          "MAX_SEQ_LEN")
    assert_one_line_error(main_py("--mode", "precision_single", "--model_path", str(tiny_ckpt), MAX_SEQ_LEN="lots"),
                          "MAX_SEQ_LEN='lots'")


def broken_copy(tiny_ckpt, tmp_path, name):
    path = tmp_path / name
    shutil.copytree(tiny_ckpt, path)
    return path


def test_broken_checkpoints_give_one_line(tiny_ckpt, tmp_path):
    cases = []
    no_config = broken_copy(tiny_ckpt, tmp_path, "no_config")
    (no_config / "config.json").unlink()
    cases.append((no_config, "config.json is missing"))

    no_shard = broken_copy(tiny_ckpt, tmp_path, "no_shard")
    (no_shard / "pytorch_model-00002-of-00002.bin").unlink()
    cases.append((no_shard, "pytorch_model-00002-of-00002.bin is named in pytorch_model.bin.index.json but missing"))

    wrong_shape = broken_copy(tiny_ckpt, tmp_path, "wrong_shape")
    config = json.loads((wrong_shape / "config.json").read_text())
    config["ffn_hidden_size"] += 8
    (wrong_shape / "config.json").write_text(json.dumps(config))
    cases.append((wrong_shape, "do not belong together"))

    truncated = broken_copy(tiny_ckpt, tmp_path, "truncated")
    shard = truncated / "pytorch_model-00001-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[:1000])
    cases.append((truncated, "may be truncated"))

    other_model = broken_copy(tiny_ckpt, tmp_path, "other_model")
    config = json.loads((other_model / "config.json").read_text())
    config["rmsnorm"] = False
    (other_model / "config.json").write_text(json.dumps(config))
    cases.append((other_model, "rmsnorm=False"))

    for path, fragment in cases:
        assert_one_line_error(main_py("--mode", "precision_single", "--model_path", str(path)), fragment)


def test_loading_writes_nothing_into_the_checkpoint(tiny_ckpt):
    before = sorted(p.name for p in tiny_ckpt.iterdir())
    assert main_py("--mode", "precision_single", "--model_path", str(tiny_ckpt), MAX_SEQ_LEN="100").returncode == 0
    assert sorted(p.name for p in tiny_ckpt.iterdir()) == before


def test_unknown_config_fields_are_ignored(tiny_ckpt, tmp_path):
    path = broken_copy(tiny_ckpt, tmp_path, "extra_fields")
    config = json.loads((path / "config.json").read_text())
    config.update(auto_map={"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"}, rope_ratio=None,
                  something_new=[1, 2])
    (path / "config.json").write_text(json.dumps(config))
    result = main_py("--mode", "precision_single", "--model_path", str(path), MAX_SEQ_LEN="100")
    assert result.returncode == 0, result.stderr


def test_demo_checkpoint_matches_the_hugging_face_layout(tiny_ckpt):
    index = json.loads((tiny_ckpt / "pytorch_model.bin.index.json").read_text())
    assert set(index["weight_map"].values()) == {"pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"}
    names = set(index["weight_map"])
    assert {"transformer.embedding.word_embeddings.weight", "transformer.rotary_pos_emb.inv_freq",
            "transformer.encoder.layers.1.self_attention.query_key_value.bias",
            "transformer.encoder.final_layernorm.weight", "transformer.output_layer.weight"} <= names
    shard = torch.load(tiny_ckpt / "pytorch_model-00001-of-00002.bin", weights_only=True)
    assert shard["transformer.embedding.word_embeddings.weight"].dtype == torch.float16
