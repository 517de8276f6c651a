"""W8A8: export_quant_weight.py, process_weights.py and main.py with ENABLE_QUANT=1 as a user runs them."""
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from chatglm2 import quant_files
from chatglm2.checkpoint import iter_tensors
from chatglm2.config import ChatGLM2Config
from chatglm2.errors import InputError
from chatglm2.quant_export import RangeObserver, write_quant_dir
from chatglm2.quant_files import FILE_NAMES, NORM_FILE
from chatglm2.quant_linear import QuantLinear, quant_matmul
from chatglm2.quant_split import write_quant_parts
from chatglm2.tensor_parallel import join_tensor
from helpers import (
    LAYERS,
    PROMPTS,
    assert_single_and_chat_run,
    assert_torchrun_matches,
    quant_env,
    run,
    write_calibration,
)
from modeling_chatglm_ascend import ChatGLM2ForCausalLM, ChatGLM2Tokenizer


@pytest.fixture(scope="module")
def setup(tiny_ckpt, tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint copy, quantized weights) after the seed's three commands: export, then process_weights for tp 1 and 2."""
    root = tmp_path_factory.mktemp("quant")
    ckpt, quant_dir = root / "ckpt", root / "quant"
    shutil.copytree(tiny_ckpt, ckpt)
    dataset = write_calibration(root / "CEval" / "val" / "Social_Science" / "teacher_qualification.jsonl")
    export = run("export_quant_weight.py", "--float_weight", str(ckpt), "--data_path", str(dataset),
                 "--quant_weight", str(quant_dir))
    assert export.returncode == 0, export.stderr
    for tp_size in (1, 2):
        split = run("process_weights.py", "--model_path", str(ckpt), "--tp_size", str(tp_size), **quant_env(quant_dir))
        assert split.returncode == 0, split.stderr
    return ckpt, quant_dir


def arrays(quant_dir: Path, name: str) -> dict[str, np.ndarray]:
    return load_file(quant_dir / f"{name}.safetensors")


@pytest.mark.slow
def test_export_writes_the_eight_dicts(setup):
    ckpt, quant_dir = setup
    float_weights = dict(iter_tensors(ckpt))
    files = {name: arrays(quant_dir, name) for name in FILE_NAMES}
    norms = arrays(quant_dir, NORM_FILE)
    for name in FILE_NAMES + (NORM_FILE,):
        pickled = np.load(quant_dir / f"{name}.npy", allow_pickle=True).item()  # np.load reads them, as modelslim's
        expected = norms if name == NORM_FILE else files[name]
        assert pickled.keys() == expected.keys() and all(np.array_equal(pickled[k], expected[k]) for k in pickled)
    for layer in LAYERS:
        f = {name: files[name][layer] for name in FILE_NAMES}
        out_features, in_features = float_weights[layer + ".weight"].shape
        assert f["quant_weight"].dtype == np.int8 and f["quant_weight"].shape == (out_features, in_features)
        assert f["quant_bias"].dtype == np.int32
        for name in ("weight_scale", "weight_offset", "deq_scale", "fp_bias", "quant_bias"):
            assert f[name].shape == (out_features,), name
        assert f["input_scale"].dtype == f["input_offset"].dtype == np.float32
        assert f["input_scale"].shape == f["input_offset"].shape == (1,)
        assert f["input_offset"][0] == round(f["input_offset"][0]) and -128 <= f["input_offset"][0] <= 127
        assert not f["weight_offset"].any()
        assert np.array_equal(f["deq_scale"], (f["input_scale"] * f["weight_scale"]).astype(np.float32))
        bias = float_weights.get(layer + ".bias", torch.zeros(out_features)).float().numpy()
        assert np.array_equal(f["fp_bias"], bias)
        expected = np.round(bias / f["deq_scale"].astype(np.float64)
                            - f["input_offset"][0] * f["quant_weight"].astype(np.int64).sum(1))
        assert np.abs(f["quant_bias"] - expected).max() <= 1
        # with smoothing, quant_weight * weight_scale is the weight with its input channels scaled by s = old / new norm
        norm = {"query_key_value": "input_layernorm", "dense_h_to_4h": "post_attention_layernorm"}.get(layer.split(".")[-1])
        scales = np.ones(in_features, np.float32)
        if norm:
            prefix = layer.rsplit(".", 2)[0]
            scales = float_weights[f"{prefix}.{norm}.weight"].float().numpy() / norms[f"{prefix}.{norm}"]
            assert np.abs(scales - 1).max() > 0.01  # smoothing did something
        weight = float_weights[layer + ".weight"].float().numpy() * scales
        error = np.abs(f["quant_weight"] * f["weight_scale"][:, None] - weight)
        assert (error <= f["weight_scale"][:, None] * 0.5 + 1e-6).all()
    assert set(files["quant_weight"]) == set(LAYERS)
    assert set(norms) == {"transformer.encoder.layers.1.input_layernorm", "transformer.encoder.layers.1.post_attention_layernorm"}


class FakeQuant(torch.nn.Module):
    """The formulas written out in float64: what QuantLinear must compute."""

    def __init__(self, quant_dir: Path, layer: str):
        super().__init__()
        f = {name: torch.from_numpy(arrays(quant_dir, name)[layer]) for name in FILE_NAMES}
        self.weight, self.bias, self.deq_scale = f["quant_weight"].double(), f["quant_bias"].double(), f["deq_scale"].double()
        self.scale, self.offset = float(f["input_scale"][0]), float(f["input_offset"][0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = torch.clamp(torch.round(x / self.scale + self.offset), -128, 127)
        return ((x_q.double() @ self.weight.T + self.bias) * self.deq_scale).to(x.dtype)


def fake_quant_model(ckpt: Path, quant_dir: Path) -> ChatGLM2ForCausalLM:
    model = ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu", dtype=torch.float32)
    for layer in LAYERS:
        parent, _, child = layer.rpartition(".")
        setattr(model.get_submodule(parent), child, FakeQuant(quant_dir, layer))
    for name, weight in arrays(quant_dir, NORM_FILE).items():
        model.get_submodule(name).weight = torch.nn.Parameter(torch.from_numpy(weight), requires_grad=False)
    return model


@pytest.mark.slow
def test_quantized_model_equals_the_fake_quant_formulas(setup):
    ckpt, quant_dir = setup
    tokenizer = ChatGLM2Tokenizer.from_pretrained(ckpt)
    batch = tokenizer(PROMPTS)
    real = batch["attention_mask"].bool()
    expected = fake_quant_model(ckpt, quant_dir)
    float_logits = ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu", dtype=torch.float32)(**batch)
    model = ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu", dtype=torch.float32, quant_path=quant_dir)
    assert all(isinstance(model.get_submodule(layer), QuantLinear) for layer in LAYERS)
    assert not any(isinstance(m, QuantLinear) for m in model.transformer.encoder.layers[0].modules())
    assert not isinstance(model.transformer.output_layer, QuantLinear)

    layer = model.get_submodule(LAYERS[0])  # one layer on its own: the int8 kernels against exact integer arithmetic
    weight = torch.from_numpy(arrays(quant_dir, "quant_weight")[LAYERS[0]])
    x = torch.randn(5, layer.in_features) * 3
    x_q = torch.clamp(torch.round(x / layer.input_scale + layer.input_offset), -128, 127)
    exact = ((x_q.long() @ weight.long().T + layer.quant_bias).float() * layer.deq_scale)
    assert torch.equal(quant_matmul(x_q.to(torch.int8), weight.t(), layer.quant_bias, layer.deq_scale, torch.float32), exact)
    assert layer.packed_weight is not None  # on CPU the layer runs oneDNN's prepacked kernel: exact up to fp32 rounding
    torch.testing.assert_close(layer(x), exact, rtol=1e-5, atol=1e-5)

    logits = model(**batch)
    assert (logits[real] - expected(**batch)[real]).abs().max().item() < 1e-4
    assert (logits[real] - float_logits[real]).abs().max().item() > 1e-4  # it does quantize
    assert torch.equal(model.generate(**batch, max_new_tokens=8), expected.generate(**batch, max_new_tokens=8))


@pytest.mark.slow
def test_tp_parts_follow_the_tensor_parallel_rules(setup):
    ckpt, quant_dir = setup
    config = ChatGLM2Config.from_dict(json.loads((ckpt / "config.json").read_text()))
    parts = {name: [arrays(quant_dir / "tp2", f"{name}{rank}") for rank in range(2)] for name in quant_files.PART_NAMES}
    for layer in LAYERS:
        weights = [torch.from_numpy(part[layer]) for part in parts["quant_weight"]]
        assert torch.equal(join_tensor(layer + ".weight", weights, config),
                           torch.from_numpy(arrays(quant_dir, "quant_weight")[layer]))
        biases, deq_scales = ([torch.from_numpy(part[layer]) for part in parts[name]] for name in ("new_bias", "new_deq_scale"))
        full_bias, full_deq = (torch.from_numpy(arrays(quant_dir, name)[layer]) for name in ("quant_bias", "deq_scale"))
        if layer.endswith(("self_attention.dense", "dense_4h_to_h")):  # row parallel
            assert torch.equal(biases[0], full_bias) and not biases[1].any()
            assert all(torch.equal(d, full_deq) for d in deq_scales)
        else:
            assert torch.equal(join_tensor(layer + ".bias", biases, config), full_bias)
            assert torch.equal(join_tensor(layer + ".bias", deq_scales, config), full_deq)


@pytest.mark.slow
def test_torchrun_tp2_equals_tp1(setup, tmp_path):
    ckpt, quant_dir = setup
    model = ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu", dtype=torch.float32, quant_path=quant_dir)
    assert_torchrun_matches(model, ckpt, 2, tmp_path, **quant_env(quant_dir))


@pytest.mark.slow
def test_every_main_mode_runs_quantized(setup, tmp_path):
    ckpt, quant_dir = setup
    env = quant_env(quant_dir)
    assert_single_and_chat_run(ckpt, env)

    dataset = write_calibration(tmp_path / "CEval" / "val" / "Social_Science" / "teacher_qualification.jsonl")
    ceval = run("main.py", "--mode", "precision_dataset", "--model_path", str(ckpt), "--ceval_dataset",
                str(dataset.parents[2]), "--precision_output_file", str(tmp_path / "result.json"),
                CEVAL_MAX_NEW_TOKENS="4", **env)
    assert ceval.returncode == 0, ceval.stderr
    assert json.loads((tmp_path / "result.json").read_text())

    csv = tmp_path / "performance.csv"
    performance = run("main.py", "--mode", "performance", "--model_path", str(ckpt), "--seqlen_in_pair", "16",
                      "--seqlen_out_pair", "4", "--performance_output_file", str(csv), **env)
    assert performance.returncode == 0, performance.stderr
    assert len(csv.read_text().splitlines()) == 2


@pytest.mark.slow
def test_files_written_by_modelslim_load(setup, tmp_path):
    """np.save'd dicts only (pickle protocol 4, no safetensors) with deq_scale as the int64 form of the fp32 bits."""
    ckpt, quant_dir = setup
    modelslim = tmp_path / "modelslim"
    modelslim.mkdir()
    for name in FILE_NAMES:
        values = arrays(quant_dir, name)
        if name == "deq_scale":
            values = {key: value.view(np.int32).astype(np.int64) for key, value in values.items()}  # sign-extended
        np.save(modelslim / f"{name}.npy", values, allow_pickle=True)
    shutil.copy(quant_dir / f"{NORM_FILE}.npy", modelslim)
    write_quant_parts(ckpt, modelslim, 1, show_progress=False)
    batch = ChatGLM2Tokenizer.from_pretrained(ckpt)(PROMPTS)
    logits = {path: ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu", dtype=torch.float32, quant_path=path)(**batch)
              for path in (quant_dir, modelslim)}
    assert torch.equal(logits[quant_dir], logits[modelslim])


class RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickles_that_would_run_code_are_refused(tmp_path):
    payload = RunsCode()
    payload.marker = str(tmp_path / "pwned")
    holder = np.empty((), dtype=object)
    holder[()] = {"transformer.encoder.layers.1.mlp.dense_4h_to_h": payload}
    with open(tmp_path / "input_scale.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(holder))
        pickle.dump(holder, f, protocol=4)
    with pytest.raises(InputError, match="pathlib.*refusing to load it"):
        quant_files.read_dict(tmp_path, "input_scale")
    assert not (tmp_path / "pwned").exists()
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(InputError, match="not the dict of arrays"):
        quant_files.read_dict(tmp_path, "plain")


def broken_copy(quant_dir: Path, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    shutil.copytree(quant_dir, path)
    return path


@pytest.mark.slow
def test_bad_quantized_weights_give_one_clear_error(setup, tmp_path, monkeypatch):
    ckpt, quant_dir = setup
    monkeypatch.setenv("ENABLE_QUANT", "1")
    monkeypatch.delenv("QUANT_WEIGHT_PATH", raising=False)
    with pytest.raises(InputError, match="ENABLE_QUANT=1 needs QUANT_WEIGHT_PATH"):
        ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu")

    missing = broken_copy(quant_dir, tmp_path, "missing")
    (missing / "weight_offset.npy").unlink()
    (missing / "weight_offset.safetensors").unlink()
    monkeypatch.delenv("ENABLE_QUANT")
    with pytest.raises(InputError, match="lacks weight_offset.npy"):
        ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu", quant_path=missing)

    with pytest.raises(InputError, match=r"no quantized parts for tp_size 4 \(only tp1, tp2\)"):
        ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu", tp_size=4, quant_path=quant_dir)

    other_tp = broken_copy(quant_dir, tmp_path, "other_tp")
    shutil.rmtree(other_tp / "tp1")
    (other_tp / "tp2").rename(other_tp / "tp1")
    with pytest.raises(InputError, match="written for tp_size 2"):
        ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu", quant_path=other_tp)

    for case, change, message in [
            ("no_layer", lambda d: d.pop(LAYERS[2]), "has no entry for transformer.encoder.layers.1.mlp.dense_h_to_4h"),
            ("bad_shape", lambda d: d.update({LAYERS[1]: d[LAYERS[1]][:, :32]}), r"has shape \(64, 32\) but")]:
        broken = broken_copy(quant_dir, tmp_path, case)
        weights = dict(arrays(broken, "quant_weight"))
        change(weights)
        quant_files.write_dict(broken, "quant_weight", weights)
        with pytest.raises(InputError, match=message):
            write_quant_parts(ckpt, broken, 1, show_progress=False)
        with pytest.raises(InputError, match="cut from other quantized weights"):  # the old parts no longer match
            ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu", quant_path=broken)

    result = run("main.py", "--mode", "precision_single", "--model_path", str(ckpt), ENABLE_QUANT="1",
                 QUANT_WEIGHT_PATH=str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: QUANT_WEIGHT_PATH") and "does not exist" in result.stderr


@pytest.mark.slow
def test_export_flags(setup, tmp_path):
    ckpt, _ = setup
    dataset = write_calibration(tmp_path / "calib.jsonl")
    sparse = run("export_quant_weight.py", "--float_weight", str(ckpt), "--data_path", str(dataset), "--quant_weight",
                 str(tmp_path / "q"), "--sparse", "--sparse_pattern", "2:4", "--sparsity", "0.7")
    assert sparse.returncode == 2 and "does not apply to --sparse_pattern 2:4" in sparse.stderr
    assert not (tmp_path / "q").exists()  # --sparse itself: tests/test_sparse.py
    plain = run("export_quant_weight.py", "--float_weight", str(ckpt), "--data_path", str(dataset), "--quant_weight",
                str(tmp_path / "q"), "--no-smooth", "--act_method", "percentile", "--percentile", "99.9")
    assert plain.returncode == 0, plain.stderr
    assert not quant_files.missing_files(tmp_path / "q") and quant_files.dict_file(tmp_path / "q", NORM_FILE) is None
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="holds no quantized weights"):
        write_quant_dir(tmp_path / "precious", {name: {} for name in FILE_NAMES})
    assert (tmp_path / "precious" / "notes.txt").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpacked_quant_linear_the_path_of_cuda_and_npu_is_exact(dtype):
    """pack=False keeps the raw int8 weight and runs quant_matmul, the branch every non-CPU tensor takes: driven here on
    CPU, it equals the exact integer formula and the packed (oneDNN) CPU layer."""
    generator = torch.Generator().manual_seed(0)
    out_features, in_features, scale, offset = 48, 64, 0.05, 3.0
    weight = torch.randint(-128, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    bias = torch.randint(-1000, 1000, (out_features,), dtype=torch.int32, generator=generator)
    deq_scale = torch.rand(out_features, generator=generator) * 1e-3
    plain = QuantLinear(in_features, out_features).load(weight, bias, deq_scale, scale, offset, pack=False)
    packed = QuantLinear(in_features, out_features).load(weight, bias, deq_scale, scale, offset)
    assert plain.packed_weight is None and plain.weight is weight and packed.packed_weight is not None
    x = (torch.randn(2, 3, in_features, generator=generator) * 3).to(dtype)
    x_q = torch.clamp(torch.round(x.float() / scale + offset), -128, 127).long()
    exact = ((x_q @ weight.long().T + bias).float() * deq_scale).to(dtype)
    assert torch.equal(plain(x), exact)
    torch.testing.assert_close(packed(x), exact, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-4)


def test_range_observers():
    values = torch.randn(1000, 50)
    minmax = RangeObserver(values.numel())
    percentile = RangeObserver(values.numel(), percentile=99.9)
    for chunk in values.split(300):
        minmax.observe(chunk)
        percentile.observe(chunk)
    ordered = values.flatten().sort().values
    assert minmax.range() == (ordered[0].item(), ordered[-1].item())
    keep = 50  # 0.1% of 50,000 values on each side
    assert percentile.range() == (ordered[keep - 1].item(), ordered[-keep].item())


@pytest.mark.slow
def test_compiled_w8a8_decode_gives_the_eager_tokens(setup):
    ckpt, quant_dir = setup
    batch = ChatGLM2Tokenizer.from_pretrained(ckpt)(PROMPTS[:2])
    eager, compiled = (ChatGLM2ForCausalLM.from_pretrained(ckpt, device="cpu", dtype=torch.float32, quant_path=quant_dir,
                                                           max_seq_len=128, compile=mode) for mode in ("off", "on"))
    assert compiled.get_submodule(LAYERS[0]).packed_weight is None  # the kernel path CUDA and NPU take
    assert torch.equal(compiled.generate(**batch, max_new_tokens=8), eager.generate(**batch, max_new_tokens=8))
