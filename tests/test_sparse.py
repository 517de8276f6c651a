"""Sparse quantization: export --sparse, process_weights.py, generate_compress_weight.py and ENABLE_SPARSE=1."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from chatglm2 import quant_files, sparse_format
from chatglm2.errors import InputError
from chatglm2.quant_export import export, prune_weight
from chatglm2.quant_linear import QuantLinear
from chatglm2.quant_split import write_quant_parts
from chatglm2.sparse_format import compress_layer, decompress_layer
from helpers import LAYERS, PROMPTS, assert_single_and_chat_run, assert_torchrun_matches, run, write_calibration
from modeling_chatglm_ascend import ChatGLM2ForCausalLM, ChatGLM2Tokenizer


def sparse_env(quant_dir: Path, compress_dir: Path) -> dict:
    return {"ENABLE_SPARSE": "1", "QUANT_WEIGHT_PATH": str(quant_dir), "COMPRESS_WEIGHT_PATH": str(compress_dir)}


@pytest.fixture(scope="module")
def setup(tiny_ckpt, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(checkpoint, quantized weights, root) after the seed's sparse commands: export --sparse, process_weights.py for
    tp 1 and 2, generate_compress_weight.py into root/compress_tp1 and root/compress_tp2."""
    root = tmp_path_factory.mktemp("sparse")
    ckpt, quant_dir = root / "ckpt", root / "quant"
    shutil.copytree(tiny_ckpt, ckpt)
    dataset = write_calibration(root / "CEval" / "val" / "Other" / "civil_servant.jsonl")
    export = run("export_quant_weight.py", "--float_weight", str(ckpt), "--data_path", str(dataset),
                 "--quant_weight", str(quant_dir), "--sparse")
    assert export.returncode == 0, export.stderr
    for tp_size in (1, 2):
        env = sparse_env(quant_dir, root / f"compress_tp{tp_size}")
        split = run("process_weights.py", "--model_path", str(ckpt), "--tp_size", str(tp_size), **env)
        assert split.returncode == 0, split.stderr
    # QUANT_WEIGHT_PATH with --tp_size, and a tp{N}/ folder itself
    for tp_size, weight_path in ((1, [f"--weight_path={quant_dir}", "--tp_size", "1"]),
                                 (2, [f"--weight_path={quant_dir / 'tp2'}"])):
        compress = run("generate_compress_weight.py", *weight_path, f"--save_path={root / f'compress_tp{tp_size}'}")
        assert compress.returncode == 0, compress.stderr
        assert compress.stdout.count("dense int8 (0.6") == tp_size  # 50% nonzero values + a 1/8 bitmask
    return ckpt, quant_dir, root


def test_prune_keeps_the_highest_scoring_weights():
    weight, norms = torch.randn(16, 24), torch.rand(24) * 10
    score = weight.abs() * norms
    pruned = prune_weight(weight, norms, "unstructured", 0.25)
    kept = pruned != 0
    assert (kept.sum(1) == 18).all() and torch.equal(pruned[kept], weight[kept])
    for row in range(16):  # every kept score beats every pruned one of its row
        assert score[row][kept[row]].min() > score[row][~kept[row]].max()
    pruned = prune_weight(weight, norms, "2:4")
    kept, score = (pruned != 0).reshape(16, 6, 4), score.reshape(16, 6, 4)
    assert (kept.sum(-1) == 2).all()
    assert (torch.where(kept, score, torch.inf).amin(-1) > torch.where(kept, -torch.inf, score).amax(-1)).all()
    with pytest.raises(InputError, match="divisible by 4"):
        prune_weight(torch.randn(4, 6), torch.ones(6), "2:4")


@pytest.mark.parametrize("shape", [(6, 20), (5, 12), (3, 8)])  # (5, 12): an odd number of 2:4 groups
def test_compress_round_trip(shape):
    weight = torch.randint(-127, 128, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    for pattern, sparse in (("bitmask", prune_weight(weight.float(), torch.ones(shape[1]), "unstructured", 0.6)),
                            ("2:4", prune_weight(weight.float(), torch.rand(shape[1]), "2:4"))):
        sparse = sparse.to(torch.int8).numpy()
        sparse[0, :4] = 0  # a 2:4 group left with no nonzero after quantization
        if pattern == "bitmask":
            sparse[-1, :3] = 1  # 3 nonzeros in a group of 4: not 2:4, whatever the random pruning kept
        found, values, index = compress_layer(sparse)
        assert found == pattern and values.size + index.size < sparse.size
        assert np.array_equal(decompress_layer(found, shape, values, index), sparse)
        with pytest.raises(InputError, match="does not fit"):
            decompress_layer(found, (shape[0], shape[1] + 4), values, index)


@pytest.mark.slow
def test_export_prunes_then_quantizes(setup, tmp_path):
    ckpt, quant_dir, root = setup
    weights = load_file(quant_dir / "quant_weight.safetensors")
    for layer in LAYERS:
        in_features = weights[layer].shape[1]
        assert ((weights[layer] == 0).sum(1) >= in_features // 2).all()  # pruned half; rounding may zero more
    prompts = [ChatGLM2Tokenizer.from_pretrained(ckpt).encode(p) for p in PROMPTS]
    export(ckpt, prompts, tmp_path / "q24", show_progress=False, sparse_pattern="2:4")
    weights = load_file(tmp_path / "q24" / "quant_weight.safetensors")
    assert all(sparse_format.is_2_4(weights[layer]) for layer in LAYERS)


@pytest.mark.slow
def test_compressed_files_decompress_to_the_parts(setup):
    _, quant_dir, root = setup
    for tp_size in (1, 2):
        info = json.loads((root / f"compress_tp{tp_size}" / "compress0" / "info.json").read_text())
        assert info["tp_size"] == tp_size and info["version"] == sparse_format.VERSION
        assert sorted(p.name for p in (root / f"compress_tp{tp_size}").iterdir()) == [f"compress{i}" for i in range(tp_size)]
        for rank in range(tp_size):
            weights = sparse_format.rank_weights(root / f"compress_tp{tp_size}", quant_dir, rank, tp_size)[0]
            parts = load_file(quant_dir / f"tp{tp_size}" / f"quant_weight{rank}.safetensors")
            assert set(weights) == set(parts) == set(LAYERS)
            assert all(np.array_equal(weights[layer], parts[layer]) for layer in LAYERS)


@pytest.mark.slow
def test_sparse_inference_equals_w8a8_on_the_same_weights(setup):
    ckpt, quant_dir, root = setup
    batch = ChatGLM2Tokenizer.from_pretrained(ckpt)(PROMPTS)
    w8a8 = ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu", dtype=torch.float32, quant_path=quant_dir)
    sparse = ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu", dtype=torch.float32, quant_path=quant_dir,
                                                 compress_path=root / "compress_tp1")
    assert all(isinstance(sparse.get_submodule(layer), QuantLinear) for layer in LAYERS)
    assert torch.equal(sparse(**batch), w8a8(**batch))
    assert torch.equal(sparse.generate(**batch, max_new_tokens=8), w8a8.generate(**batch, max_new_tokens=8))


@pytest.mark.slow
def test_torchrun_tp2_sparse_equals_tp1(setup, tmp_path):
    ckpt, quant_dir, root = setup
    model = ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu", dtype=torch.float32, quant_path=quant_dir,
                                                compress_path=root / "compress_tp1")
    assert_torchrun_matches(model, ckpt, 2, tmp_path, **sparse_env(quant_dir, root / "compress_tp2"))


@pytest.mark.slow
def test_main_modes_run_sparse(setup):
    ckpt, quant_dir, root = setup
    assert_single_and_chat_run(ckpt, sparse_env(quant_dir, root / "compress_tp1"))


def corrupt(compress_dir: Path, tmp_path: Path, name: str, change) -> Path:
    copy = tmp_path / name
    shutil.copytree(compress_dir, copy)
    file = copy / "compress0" / "values.safetensors"
    data = bytearray(file.read_bytes())
    file.write_bytes(change(data))
    return copy


@pytest.mark.slow
def test_bad_compressed_weights_give_one_clear_error(setup, tmp_path, monkeypatch):
    ckpt, quant_dir, root = setup
    monkeypatch.setenv("ENABLE_SPARSE", "1")
    monkeypatch.setenv("QUANT_WEIGHT_PATH", str(quant_dir))
    monkeypatch.delenv("COMPRESS_WEIGHT_PATH", raising=False)
    with pytest.raises(InputError, match="ENABLE_SPARSE=1 needs COMPRESS_WEIGHT_PATH"):
        ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu")
    monkeypatch.delenv("ENABLE_SPARSE")

    def flip_last_byte(data: bytearray) -> bytearray:
        data[-1] ^= 0xFF
        return data

    for compress_dir, tp_size, message in [
            (root / "compress_tp2", 1, "holds compress1/, so it was compressed for a larger tp_size than 1"),
            (root / "compress_tp1", 2, "compressed for tp_size 1, not 2"),
            (corrupt(root / "compress_tp1", tmp_path, "flipped", flip_last_byte), 1, "does not match the checksum"),
            (corrupt(root / "compress_tp1", tmp_path, "truncated", lambda d: d[:-5]), 1, "not a readable safetensors")]:
        with pytest.raises(InputError, match=message):
            ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu", tp_size=tp_size, quant_path=quant_dir,
                                                compress_path=compress_dir)

    # parts cut again from another export make the compressed weights stale (cut again from the same one, they are not)
    other = tmp_path / "other_quant"
    shutil.copytree(quant_dir, other)
    write_quant_parts(ckpt, other, 1, show_progress=False)
    ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu", quant_path=other, compress_path=root / "compress_tp1")
    weights = {layer: weight.copy() for layer, weight in load_file(other / "quant_weight.safetensors").items()}
    weights[LAYERS[0]][0, 0] ^= 1
    quant_files.write_dict(other, "quant_weight", weights)
    write_quant_parts(ckpt, other, 1, show_progress=False)
    with pytest.raises(InputError, match="compressed from other quantized weights"):
        ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu", quant_path=other, compress_path=root / "compress_tp1")

    result = run("main.py", "--mode", "precision_single", "--model_path", str(ckpt), ENABLE_SPARSE="1",
                 QUANT_WEIGHT_PATH=str(quant_dir), COMPRESS_WEIGHT_PATH=str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: COMPRESS_WEIGHT_PATH")


@pytest.mark.slow
def test_generate_compress_weight_refusals(setup, tmp_path):
    ckpt, quant_dir, root = setup
    several = run("generate_compress_weight.py", "--weight_path", str(quant_dir), "--save_path", str(tmp_path / "c"))
    assert several.returncode == 2 and "holds parts for tp1, tp2; choose one with --tp_size" in several.stderr
    dense = tmp_path / "dense"
    shutil.copytree(quant_dir, dense)
    sparse = load_file(quant_dir / "quant_weight.safetensors")
    weights = {layer: np.where(weight == 0, 1, weight).astype(np.int8) for layer, weight in sparse.items()}
    quant_files.write_dict(dense, "quant_weight", weights)
    write_quant_parts(ckpt, dense, 1, show_progress=False)
    refused = run("generate_compress_weight.py", "--weight_path", str(dense), "--save_path", str(tmp_path / "c"),
                  "--tp_size", "1")
    assert refused.returncode == 2 and "is not sparse" in refused.stderr and not (tmp_path / "c").exists()
    flags = run("export_quant_weight.py", "--float_weight", str(ckpt), "--data_path", str(tmp_path / "x.jsonl"),
                "--quant_weight", str(tmp_path / "q"), "--sparsity", "0.7")
    assert flags.returncode == 2 and "need --sparse" in flags.stderr
