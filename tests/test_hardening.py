"""Issue 12: never overwrite or lose what the user owns, one clear line for every bad input, staleness by content."""
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import pyplot

from chatglm2.atomic import atomic_directory, write_text_atomic
from chatglm2.chat_modes import printable
from chatglm2.checkpoint import (
    MARKER,
    files_fingerprint,
    iter_tensors,
    read_config,
    weight_files,
    write_checkpoint,
)
from chatglm2.config import ChatGLM2Config
from chatglm2.errors import InputError
from chatglm2.quant_files import write_dict
from chatglm2.tensor_parallel import part_root, write_tp_parts
from helpers import ROOT, assert_one_line_error, free_port, main_py, process_weights, run, run_env, torchrun
from modeling_chatglm_ascend import ChatGLM2Tokenizer


def copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- 1, 2: replace only what we wrote

def test_write_checkpoint_replaces_only_its_own_folder(tiny_ckpt, tmp_path):
    config, tensors = read_config(tiny_ckpt), {"x": torch.zeros(2)}
    (tmp_path / "empty").mkdir()
    write_checkpoint(tmp_path / "empty", config, [tensors], 1, tiny_ckpt)
    assert MARKER in os.listdir(tmp_path / "empty")
    write_checkpoint(tmp_path / "empty", config, [{"y": torch.ones(3)}], 1, tiny_ckpt)  # its own output: replaced
    assert set(dict(iter_tensors(tmp_path / "empty"))) == {"y"}

    (tmp_path / "empty" / "notes.txt").write_text("mine")
    clone = tmp_path / "clone"
    (clone / ".git").mkdir(parents=True)
    (clone / "config.json").write_text("{}")
    (tmp_path / "file").write_text("mine")
    for target, fragment in ((tmp_path / "empty", "notes.txt"), (clone, ".git, config.json"), (tmp_path / "file", "not a folder")):
        before = tree(tmp_path)
        with pytest.raises(InputError, match=fragment):
            write_checkpoint(target, config, [tensors], 1, tiny_ckpt)
        assert tree(tmp_path) == before


@pytest.mark.slow
def test_demo_checkpoint_never_deletes_a_folder_it_did_not_write(tmp_path):
    small = ("--num_layers", "1", "--hidden_size", "64", "--ffn_hidden_size", "160", "--num_shards", "1")
    clone = tmp_path / "clone"
    (clone / ".git").mkdir(parents=True)
    (clone / "README.md").write_text("mine")
    assert_one_line_error(run("demo_checkpoint.py", str(clone), *small), ".git, README.md", "did not write")
    assert (clone / "README.md").read_text() == "mine" and (clone / ".git").is_dir()

    demo = tmp_path / "demo"
    assert run("demo_checkpoint.py", str(demo), *small).returncode == 0
    weights = (demo / "pytorch_model.bin").read_bytes()
    again = run("demo_checkpoint.py", str(demo), *small, "--seed", "1")
    assert again.returncode == 0, again.stderr
    assert (demo / "pytorch_model.bin").read_bytes() != weights  # its own output is replaced
    (demo / "notes.txt").write_text("mine")
    assert_one_line_error(run("demo_checkpoint.py", str(demo), *small), "notes.txt")
    assert (demo / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_process_weights_output_path_never_replaces_a_checkpoint(tiny_ckpt, tmp_path):
    other = copy(tiny_ckpt, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config["seq_length"] = 1024  # another model's config: any difference counts
    (other / "config.json").write_text(json.dumps(config))
    before = tree(other)
    assert_one_line_error(process_weights(tiny_ckpt, 2, "--output_path", str(other)), "config.json",
                          "choose a new or empty folder")
    assert tree(other) == before

    out = tmp_path / "out"
    out.mkdir()
    for tp_size in (2, 4, 2):  # new, empty, then its own output again (and again)
        result = process_weights(tiny_ckpt, tp_size, "--output_path", str(out))
        assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["config.json", "tensor_parallel_tp2", "tensor_parallel_tp4", "tokenizer.model",
                                       "tokenizer_config.json"]
    (out / "notes.txt").write_text("mine")
    assert_one_line_error(process_weights(tiny_ckpt, 2, "--output_path", str(out)), "notes.txt")
    # --output_path spelling the checkpoint itself is the default place, not a foreign folder
    inside = copy(tiny_ckpt, tmp_path / "inside")
    assert process_weights(inside, 2, "--output_path", os.path.relpath(inside, ROOT)).returncode == 0
    assert (part_root(inside, 2) / "1" / "config.json").is_file()


# --------------------------------------------------------------------------- 3: output files

@pytest.mark.slow
@pytest.mark.parametrize("case", ["png name", "folder", "binary", "foreign chart"])
def test_performance_output_clashes_are_refused_before_timing(tiny_ckpt, tmp_path, case):
    output = tmp_path / "perf.csv"
    if case == "png name":
        output, fragment = tmp_path / "chart.png", "ends in .png"
    elif case == "folder":
        output.mkdir()
        fragment = "is not a file"
    elif case == "binary":
        output.write_bytes(bytes(range(256)))
        fragment = "not UTF-8 text"
    else:
        pyplot.imsave(tmp_path / "perf.png", np.zeros((4, 4)))  # the user's own picture
        fragment = "not a chart drawn by this benchmark"
    before = tree(tmp_path)
    result = main_py("--mode", "performance", "--model_path", str(tiny_ckpt), "--seqlen_in_pair", "8",
                     "--seqlen_out_pair", "3", "--performance_output_file", str(output))
    assert_one_line_error(result, fragment)
    assert "TimePerToken" not in result.stdout and tree(tmp_path) == before


def ceval_dataset(root: Path) -> Path:
    (root / "val" / "STEM").mkdir(parents=True)
    line = json.dumps({"inputs_pretokenized": "1+1=?\nA. 1\nB. 2\nC. 3\nD. 4", "label": 1})
    (root / "val" / "STEM" / "logic.jsonl").write_text(line + "\n", encoding="utf-8")
    return root


def ceval(ckpt: Path, dataset: Path, output: Path) -> subprocess.CompletedProcess:
    return main_py("--mode", "precision_dataset", "--model_path", str(ckpt), "--ceval_dataset", str(dataset),
                   "--precision_output_file", str(output), CEVAL_MAX_NEW_TOKENS="2", MAX_SEQ_LEN="200")


@pytest.mark.slow
def test_ceval_output_clashes_and_concurrent_runs_are_refused(tiny_ckpt, tmp_path):
    dataset = ceval_dataset(tmp_path / "CEval")
    out = tmp_path / "out"
    out.mkdir()
    (out / "folder.json").mkdir()
    (out / "mine.csv").write_text("my,own\n1,2\n")
    cases = [(out / "res.csv", "ends in .csv"), (out / "folder.json", "is not a file"),
             (out / "mine.json", "not a C-Eval table written by this tool")]
    for output, fragment in cases:
        before = tree(out)
        assert_one_line_error(ceval(tiny_ckpt, dataset, output), fragment)
        assert tree(out) == before

    output = out / "res.json"
    lock = out / ".res.json.lock"
    with open(lock, "w") as held:  # another run holds the results file
        fcntl.flock(held, fcntl.LOCK_EX)
        assert_one_line_error(ceval(tiny_ckpt, dataset, output), "another run is writing")
        assert not output.exists()
    result = ceval(tiny_ckpt, dataset, output)  # once it has finished, the file is free
    assert result.returncode == 0, result.stderr
    assert len(json.loads(output.read_text(encoding="utf-8"))) == 1


# --------------------------------------------------------------------------- 4: what a killed write leaves

ATOMIC_WRITE = """
import os, sys, time
from chatglm2.atomic import atomic_directory
with atomic_directory(sys.argv[1]):
    print("writing", flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), 9)
    time.sleep(120)
"""


@pytest.mark.slow
def test_temporary_folders_of_killed_runs_are_removed_and_nothing_else(tiny_ckpt, tmp_path):
    ckpt = copy(tiny_ckpt, tmp_path / "ckpt")
    parts = part_root(ckpt, 2)
    killed = run("-c", ATOMIC_WRITE, str(parts / "0"), "die")  # as process_weights.py killed while writing rank 0
    assert killed.returncode == -signal.SIGKILL
    (stale,) = [p for p in parts.iterdir() if p.name.startswith(".0.")]
    lookalikes = [parts / ".0.tmp", parts / ".0.mine.tmp", parts / "0.abcdefgh.tmp", parts / ".01.abcdefgh.tmp"]
    for path in lookalikes:
        path.mkdir()
    live = subprocess.Popen([sys.executable, "-c", ATOMIC_WRITE, str(parts / "1"), "live"], cwd=ROOT, env=run_env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline() == "writing\n"
        (writing,) = [p for p in parts.iterdir() if p.name.startswith(".1.")]
        result = process_weights(ckpt, 2)
        assert result.returncode == 0, result.stderr
        assert not stale.exists() and writing.is_dir() and all(path.is_dir() for path in lookalikes)
    finally:
        live.kill()
        live.wait()
    assert process_weights(ckpt, 2).returncode == 0  # now that its writer is dead, that one goes too
    assert sorted(p.name for p in parts.iterdir()) == sorted(["0", "1"] + [path.name for path in lookalikes])


# --------------------------------------------------------------------------- 5, 7: one line for bad checkpoints

def cut_half(path: Path) -> None:
    shard = sorted(path.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])


def damage_header(path: Path) -> None:
    shard = sorted(path.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[8:20] = b"not a header"
    shard.write_bytes(bytes(data))


def save_first_bin(value) -> callable:
    return lambda path: torch.save(value, path / "pytorch_model-00001-of-00002.bin")


def write_file(name: str, data: str | bytes) -> callable:
    return lambda path: (path / name).write_bytes(data.encode() if isinstance(data, str) else data)


def set_config(**fields) -> callable:
    def change(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(dict(config, **fields)))
    return change


def set_weight_map(weight_map) -> callable:
    return write_file("pytorch_model.bin.index.json", json.dumps({"metadata": {}, "weight_map": weight_map}))


EMBEDDING = "transformer.embedding.word_embeddings.weight"
BROKEN = {
    "truncated safetensors": ("st", cut_half, "may be truncated or damaged"),
    "damaged safetensors header": ("st", damage_header, "invalid JSON in header"),
    "bin holding a list": ("bin", save_first_bin([torch.zeros(2)]), "holds a list, not the dict of tensors"),
    "bin holding a number": ("bin", save_first_bin({EMBEDDING: 3}), f"holds '{EMBEDDING}': int"),
    "config a number": ("bin", write_file("config.json", "5"), "holds 5, not a JSON object"),
    "config a list": ("bin", write_file("config.json", "[1]"), "holds [1], not a JSON object"),
    "config num_layers a string": ("bin", set_config(num_layers="2"), 'num_layers to "2", not an integer'),
    "config num_layers true": ("bin", set_config(num_layers=True), "num_layers to true, not an integer"),
    "config float_layers_id": ("bin", set_config(float_layers_id="0"), "not a list of integers"),
    "config zero heads": ("bin", set_config(num_attention_heads=0), "num_attention_heads to 0"),
    "config not UTF-8": ("bin", write_file("config.json", b'{"num_layers": "\xff"}'), "not valid UTF-8 JSON"),
    "weight_map a list": ("bin", set_weight_map(["pytorch_model-00001-of-00002.bin"]), "no valid 'weight_map'"),
    "weight_map of numbers": ("bin", set_weight_map({EMBEDDING: 1}), "no valid 'weight_map'"),
    "index ../": ("bin", set_weight_map({EMBEDDING: "../tiny_bin/pytorch_model-00001-of-00002.bin"}),
                  "outside the checkpoint folder"),
    "index absolute": ("bin", set_weight_map({EMBEDDING: "/etc/passwd"}), "outside the checkpoint folder"),
    "garbage tokenizer.model": ("bin", write_file("tokenizer.model", "garbage\n"), "not a SentencePiece model"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", BROKEN)
def test_broken_checkpoints_give_one_line(tiny_ckpt, tiny_ckpt_safetensors, tmp_path, case):
    kind, breaks, fragment = BROKEN[case]
    path = copy(tiny_ckpt if kind == "bin" else tiny_ckpt_safetensors, tmp_path / "ckpt")
    breaks(path)
    assert_one_line_error(main_py("--mode", "precision_single", "--model_path", str(path), MAX_SEQ_LEN="100"), fragment)
    if case != "garbage tokenizer.model":  # process_weights.py copies the tokenizer without reading it
        before = tree(path)
        assert_one_line_error(process_weights(path, 2), fragment)
        assert tree(path) == before and not (path / "tensor_parallel_tp2").exists()


def test_index_paths_must_stay_inside_the_checkpoint(tiny_ckpt, tmp_path):
    path = copy(tiny_ckpt, tmp_path / "ckpt")
    for name in ("../ckpt/pytorch_model-00001-of-00002.bin", "/etc/passwd", "sub/../../x.bin"):
        set_weight_map({EMBEDDING: name})(path)
        with pytest.raises(InputError, match="outside the checkpoint folder"):
            weight_files(path)
    (path / "sub").mkdir()
    shutil.copy(tiny_ckpt / "pytorch_model-00001-of-00002.bin", path / "sub" / "shard.bin")
    set_weight_map({EMBEDDING: "sub/shard.bin"})(path)  # a subfolder is inside
    assert weight_files(path) == {EMBEDDING: path / "sub" / "shard.bin"}


def test_config_fields_of_the_wrong_type_are_refused():
    good = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 160, "kv_channels": 8, "num_attention_heads": 8,
            "padded_vocab_size": 128}
    assert ChatGLM2Config.from_dict(dict(good, layernorm_epsilon=1e-5, rope_ratio=1, float_layers_id=[0, 1])).rope_ratio == 1
    for field, value in (("hidden_size", 64.0), ("multi_query_attention", 1), ("layernorm_epsilon", "1e-5"),
                         ("float_layers_id", [0.5]), ("num_layers", -1)):
        with pytest.raises(InputError, match=field):
            ChatGLM2Config.from_dict(dict(good, **{field: value}))


@pytest.mark.slow
def test_other_bad_inputs_give_one_line(tiny_ckpt, tmp_path):
    model = ("--mode", "precision_single", "--model_path", str(tiny_ckpt))
    assert_one_line_error(main_py(*model, TP_TIMEOUT_S="abc"), "TP_TIMEOUT_S='abc' is not a positive integer")
    assert_one_line_error(run("openai_api.py", "--model_path", str(tiny_ckpt), "--kv_cache_memory", "0.0000001",
                              "--server_port", str(free_port())),
                          "less than one sequence of MAX_SEQ_LEN=2048")
    for port in ("99999", "0", "http"):
        assert_one_line_error(run("web_demo.py", "--model_path", str(tiny_ckpt), "--server_port", port),
                              f"'{port}' is not a TCP port (1 to 65535)")
    (tmp_path / "notes.txt").write_text("ChatGLM2ForCausalLM = 1\n")
    (tmp_path / "raises.py").write_text("import nonexistent_module_for_the_test\n")
    (tmp_path / "syntax.py").write_text("def broken(:\n")
    for file, fragments in (("notes.txt", ["is not a Python file"]), ("raises.py", ["fails to import", "ModuleNotFound"]),
                            ("syntax.py", ["fails to import", "SyntaxError"])):
        assert_one_line_error(main_py(*model, "--model_file", str(tmp_path / file)), *fragments)


# --------------------------------------------------------------------------- cli_demo and what reaches the terminal

def test_printable_escapes_control_characters_only():
    assert printable("a\x1b[2Jb\x07c\r\x85\n\t中文") == "a\\x1b[2Jb\\x07c\\r\\x85\n\t中文"


@pytest.fixture(scope="module")
def control_ckpt(tiny_ckpt, tmp_path_factory) -> Path:
    """A checkpoint whose every next token is a control character: the final norm keeps one hidden channel, and the
    only output rows reading it are those of ESC (+) and BEL (-), so one of them wins whatever the channel's sign."""
    sp = ChatGLM2Tokenizer.from_pretrained(tiny_ckpt).sp
    esc, bel = sp.piece_to_id("<0x1B>"), sp.piece_to_id("<0x07>")
    assert esc != sp.unk_id() and bel != sp.unk_id()
    tensors = dict(iter_tensors(tiny_ckpt))
    norm = torch.zeros_like(tensors["transformer.encoder.final_layernorm.weight"])
    norm[0] = 1
    output = torch.zeros_like(tensors["transformer.output_layer.weight"])
    output[esc, 0], output[bel, 0] = 50, -50
    tensors.update({"transformer.encoder.final_layernorm.weight": norm, "transformer.output_layer.weight": output})
    path = tmp_path_factory.mktemp("control") / "ckpt"
    write_checkpoint(path, read_config(tiny_ckpt), [tensors], 1, tiny_ckpt)
    return path


def assert_no_raw_control_characters(text: str) -> None:
    assert not [c for c in text if c not in "\n\t" and (ord(c) < 32 or 127 <= ord(c) < 160)], repr(text[-300:])


@pytest.mark.slow
def test_answers_reach_the_terminal_escaped(control_ckpt):
    single = main_py("--mode", "precision_single", "--model_path", str(control_ckpt), MAX_SEQ_LEN="100")
    assert single.returncode == 0, single.stderr
    assert_no_raw_control_characters(single.stdout)
    answer = next(line for line in single.stdout.splitlines() if line.startswith("[batch 0]"))
    assert "\\x1b" in answer or "\\x07" in answer
    chat = main_py("--mode", "cli_demo", "--model_path", str(control_ckpt), stdin="你好\n", MAX_SEQ_LEN="100")
    assert chat.returncode == 0, chat.stderr
    assert_no_raw_control_characters(chat.stdout)
    assert "\\x1b" in chat.stdout or "\\x07" in chat.stdout


@pytest.mark.slow
def test_cli_demo_survives_input_that_is_not_utf8_and_clear_starts_a_new_line(tiny_ckpt):
    result = subprocess.run([sys.executable, "main.py", "--mode", "cli_demo", "--model_path", str(tiny_ckpt)],
                            input=b"\xff\xfe\n" + "你好\nclear\n".encode(),
                            cwd=ROOT, env=run_env(MAX_SEQ_LEN="100"), capture_output=True, timeout=300)
    stdout = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "not UTF-8" in stdout and stdout.count("ChatGLM：") == 1
    assert stdout.count("欢迎使用") == 2 and "用户：欢迎使用" not in stdout  # after clear, on a line of its own


# --------------------------------------------------------------------------- 8: staleness by content

def test_fingerprint_follows_content_not_times(tmp_path):
    big = tmp_path / "a.safetensors"
    big.write_bytes(os.urandom(3 * 2 ** 20))
    same = tmp_path / "copy" / "a.safetensors"
    same.parent.mkdir()
    shutil.copyfile(big, same)  # a new modification time
    os.utime(same, (0, 0))
    assert files_fingerprint([big]) == files_fingerprint([same])
    for offset in (0, 2 ** 20 - 1, 3 * 2 ** 20 - 1):  # first and last MiB
        data = bytearray(big.read_bytes())
        data[offset] ^= 1
        same.write_bytes(bytes(data))
        assert files_fingerprint([big]) != files_fingerprint([same])
    same.write_bytes(big.read_bytes() + b"\0")
    assert files_fingerprint([big]) != files_fingerprint([same])


# --------------------------------------------------------------------------- 9: modes follow the umask

def test_written_files_honour_the_umask(tiny_ckpt, tmp_path):
    old = os.umask(0o027)
    try:
        write_checkpoint(tmp_path / "st", read_config(tiny_ckpt), [{"x": torch.zeros(2)}], 1, tiny_ckpt,
                         safetensors=True)
        write_tp_parts(copy(tiny_ckpt, tmp_path / "ckpt"), 2, tmp_path / "parts", show_progress=False)
        write_text_atomic(tmp_path / "text" / "a.txt", "x")
        with atomic_directory(tmp_path / "dicts") as folder:
            write_dict(folder, "quant_weight", {"layer": np.zeros(2, np.int8)})
        (tmp_path / "sibling").write_text("x")
    finally:
        os.umask(old)
    written = [p for p in tmp_path.rglob("*") if not p.is_relative_to(tmp_path / "ckpt")]
    assert {"model.safetensors", "model-00002-of-00002.safetensors", "quant_weight.safetensors", "a.txt", MARKER} <= \
        {p.name for p in written}
    for path in written:
        assert path.stat().st_mode & 0o777 == (0o750 if path.is_dir() else 0o640), path


# --------------------------------------------------------------------------- 12: every rank ends with the same status

@pytest.mark.slow
def test_an_error_found_by_rank0_ends_every_rank_with_status_2(tiny_ckpt, tmp_path):
    ckpt = copy(tiny_ckpt, tmp_path / "ckpt")
    assert process_weights(ckpt, 2).returncode == 0
    (tmp_path / "perf.csv").mkdir()
    result = torchrun(2, "main.py", "--mode", "performance", "--model_path", str(ckpt), "--tp_size", "2",
                      "--seqlen_in_pair", "8", "--seqlen_out_pair", "3", "--performance_output_file",
                      str(tmp_path / "perf.csv"))
    assert result.returncode != 0 and result.stderr.count("error: ") == 1 and "is not a file" in result.stderr
    # torchrun's own summary (which no worker can suppress) lists both ranks, each with the same status
    assert result.stderr.count("exitcode  : 2") == 2


@pytest.mark.slow
def test_memory_is_checked_before_allocating(tiny_ckpt, tmp_path):
    """Absurd sizes are refused within seconds, with the numbers, before anything large is allocated."""
    args = ["--mode", "precision_single", "--model_path", str(tiny_ckpt)]
    assert_one_line_error(main_py(*args, MAX_SEQ_LEN="10000000000", timeout=60), "needs", "GiB", "lower MAX_SEQ_LEN")
    assert_one_line_error(main_py(*args, "--batch", "100000", timeout=60), "KV cache of 204800000 tokens", "needs")
    huge = tmp_path / "huge"
    shutil.copytree(tiny_ckpt, huge)
    config = json.loads((huge / "config.json").read_text())
    (huge / "config.json").write_text(json.dumps(dict(config, num_layers=100000)))
    assert_one_line_error(main_py("--mode", "precision_single", "--model_path", str(huge), timeout=60),
                          "needs", "check num_layers in config.json")
