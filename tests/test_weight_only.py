"""Weight-only int8 / int4 in one process: THUDM's packing, the quantizers, the kernels against the portable path, and
models that must compute what their dequantized float weights compute."""
import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks.quant_accuracy import q4_0
from chatglm2.checkpoint import iter_tensors, write_checkpoint
from chatglm2.config import ChatGLM2Config
from chatglm2.errors import InputError
from chatglm2.loading import load_pretrained
from chatglm2.memory import module_bytes
from chatglm2.random_checkpoint import write_demo_checkpoint
from chatglm2.tensor_parallel import join_tensor, part_root
from chatglm2.weight_only import (DEFAULT_GROUP_SIZE, ENCODER_LINEARS, from_thudm, plan_layers, quantize_int4,
                                  quantize_int8, thudm_quantize, use_weight_only_layers, write_thudm_checkpoint)
from chatglm2.weight_only_linear import HAS_FBGEMM, WeightOnlyLinear, dequantize, portable_kernels
from helpers import (PROMPTS, assert_one_line_error, assert_torchrun_matches, free_port, main_py, process_weights,
                     quant_env, run, start_server, stop, torchrun, write_calibration)
from modeling_chatglm_ascend import ChatGLM2ForCausalLM, ChatGLM2Tokenizer
from reference_glm import glm_reference

CPU = torch.device("cpu")
# Wide enough for the CPU int4 kernel (output rows in multiples of 16, groups of 32 that divide every width, also per
# rank at tp 2), small enough for 2 cores.
WO_SHAPE = dict(num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=8, kv_channels=16,
                multi_query_group_num=2)


@pytest.fixture(scope="session")
def wo_ckpt(tmp_path_factory) -> Path:
    return write_demo_checkpoint(tmp_path_factory.mktemp("wo") / "bin", num_shards=2, **WO_SHAPE)


@pytest.fixture(scope="session")
def wo_ckpt_safetensors(tmp_path_factory) -> Path:
    """Safetensors sort post_attention_layernorm after the MLP, and 3 shards split layers: dense_h_to_4h waits for
    the norm folded into it."""
    return write_demo_checkpoint(tmp_path_factory.mktemp("wo") / "st", num_shards=3, safetensors=True, seed=1,
                                 **WO_SHAPE)


@pytest.fixture(scope="session", params=[4, 8])
def thudm_ckpt(request, wo_ckpt, tmp_path_factory) -> Path:
    return write_thudm_checkpoint(wo_ckpt, tmp_path_factory.mktemp("thudm") / f"int{request.param}", request.param)


def load(path: Path, dtype: torch.dtype = torch.float32, **options) -> ChatGLM2ForCausalLM:
    return ChatGLM2ForCausalLM.from_pretrained(path, device="cpu", dtype=dtype, **options)


def write_float_copy(tensors: dict[str, torch.Tensor], ckpt: Path, out: Path) -> Path:
    config = json.loads((ckpt / "config.json").read_text())
    config.pop("quantization_bit", None)
    write_checkpoint(out, config, [tensors], 1, ckpt)
    return out


def dequantized_copy(model: ChatGLM2ForCausalLM, ckpt: Path, out: Path) -> Path:
    """A float checkpoint of what a (portable) weight-only model holds: every weight-only layer dequantized, every
    other tensor (the folded norms included) as loaded."""
    tensors = {name: param.detach().clone() for name, param in model.named_parameters()}
    for name, module in model.named_modules():
        if isinstance(module, WeightOnlyLinear):
            assert module.kernel == "portable"
            tensors[f"{name}.weight"] = dequantize(module.weight, module.scales, module.bits, torch.float32)
    return write_float_copy(tensors, ckpt, out)


def round_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row to 8 bits on its own grid, max|row| / 127: what quantize_activations does to an int8 layer's input."""
    step = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.round(x / step) * step


def rounds_inputs(model: torch.nn.Module) -> bool:
    return any(isinstance(m, WeightOnlyLinear) and m.quantize_activations for m in model.modules())


def with_int8_inputs(reference: ChatGLM2ForCausalLM, model: ChatGLM2ForCausalLM) -> ChatGLM2ForCausalLM:
    """`reference` with the inputs of every layer that rounds its activations in `model` rounded so: the function
    the model computes, written independently of its code."""
    for name, module in model.named_modules():
        if isinstance(module, WeightOnlyLinear) and module.quantize_activations:
            reference.get_submodule(name).register_forward_pre_hook(lambda _, args: (round_rows(args[0]),))
    return reference


def held_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """module_bytes, plus the int8 weights that fbgemm layers hold in its own packed copy instead of `weight`."""
    return module_bytes(model, dtype) + sum(m.in_features * m.out_features for m in model.modules()
                                            if isinstance(m, WeightOnlyLinear) and m.kernel == "fbgemm")


def assert_same_function(model: ChatGLM2ForCausalLM, reference: ChatGLM2ForCausalLM, ckpt: Path) -> None:
    """Logits to 1e-4 and greedy tokens. Where `model` rounds layer inputs to 8 bits, float noise of 1e-7 can move a
    value across a rounding boundary and that position's logits by up to 1e-2: a few positions may differ so, never
    most (a wrong formula moves them all)."""
    batch = ChatGLM2Tokenizer.from_pretrained(ckpt)(PROMPTS)
    real = batch["attention_mask"].bool()
    error = (model(**batch)[real] - reference(**batch)[real]).abs().amax(-1)
    if rounds_inputs(model):
        assert error.max().item() < 2e-2 and (error < 1e-4).float().mean().item() >= 0.9, error
    else:
        assert error.max().item() < 1e-4
    assert torch.equal(model.generate(**batch, max_new_tokens=12), reference.generate(**batch, max_new_tokens=12))


def test_thudm_int4_bytes_hold_the_first_value_in_the_high_nibble():
    """THUDM's kernel reads w >> 4 then (char)(w << 4) >> 4: [7, -3, 1, -7] (scale 1) is the bytes 0x7D, 0x19."""
    weight, scale = thudm_quantize(torch.tensor([[7.0, -3.0, 1.0, -7.0]]), 4)
    assert weight.dtype == torch.int8 and weight.view(torch.uint8).tolist() == [[0x7D, 0x19]]
    assert scale.tolist() == [1.0]
    # chatglm.cpp's converter unpacks the same way
    high, low = (weight & 0xF0) >> 4, ((weight << 4) & 0xF0) >> 4
    assert torch.stack((high, low), -1).flatten(-2).tolist() == [[7, -3, 1, -7]]
    packed, scales = from_thudm(weight, scale, 4, 4, torch.float32)
    assert dequantize(packed, scales, 4, torch.float32).tolist() == [[7.0, -3.0, 1.0, -7.0]]


def test_quantizers_round_to_the_nearest_code_and_keep_zero():
    torch.manual_seed(0)
    weight = torch.randn(48, 256) * 0.02
    weight[3] = 0  # an all-zero row
    weight[5, :64] = 0  # zeros inside a group with other values
    weight[7, 10] = 0.5  # an outlier
    q, scale = quantize_int8(weight, torch.float32, CPU)
    error = (dequantize(q, scale, 8, torch.float32) - weight).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all() and q.abs().max() <= 127
    for group in (32, 128):
        packed, scales = quantize_int4(weight, group, torch.float32, CPU)
        error = (dequantize(packed, scales, 4, torch.float32) - weight).abs().view(48, -1, group)
        step = scales[..., 0].t()[..., None]
        assert (error <= step / 2 + 1e-7).all()
        assert (dequantize(packed, scales, 4, torch.float32)[weight == 0] == 0).all()  # 0 is a code


@pytest.mark.parametrize("bits, quantize_activations", [(8, False), (8, True), (4, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features", [96, 40])
def test_layer_kernels_compute_the_dequantized_matmul(bits, quantize_activations, dtype, out_features):
    """Every kernel a CPU layer can take (torch._weight_int8pack_mm, fbgemm for int8 that rounds its activations, the
    int4 kernel) and the portable path (what every device falls back to), against F.linear on the dequantized weight,
    with a bias, for a 3-d input; with quantize_activations, on the input rows rounded to 8 bits, which every kernel
    must compute alike. 40 output rows are not a multiple of 16, so int4 falls back to the portable path on the CPU."""
    torch.manual_seed(0)
    weight, bias, x = torch.randn(out_features, 256) * 0.05, torch.randn(out_features), torch.randn(2, 3, 256)
    stored = quantize_int8(weight, dtype, CPU) if bits == 8 else quantize_int4(weight, 64, dtype, CPU)
    x_in, bias_in, weight_in = x.to(dtype).float(), bias.to(dtype).float(), dequantize(*stored, bits, torch.float32)
    expected = F.linear(round_rows(x_in) if quantize_activations else x_in, weight_in, bias_in)
    cpu_kernel = "cpu" if bits == 8 or out_features % 16 == 0 else "portable"
    fastest = "fbgemm" if quantize_activations and HAS_FBGEMM else cpu_kernel
    for kernel, portable, traceable in (("portable", True, False), (cpu_kernel, False, True), (fastest, False, False)):
        layer = WeightOnlyLinear(256, out_features, bits, 64, True, dtype)
        layer.bias = torch.nn.Parameter(bias.to(dtype), requires_grad=False)
        layer.quantize_activations = quantize_activations
        with portable_kernels() if portable else contextlib.nullcontext():
            layer.load(*stored, traceable=traceable)
        assert layer.kernel == kernel
        y = layer(x.to(dtype))
        assert y.dtype == dtype and y.shape == (2, 3, out_features)
        tolerance = 1e-5 if dtype == torch.float32 else 0.05
        assert (y.float() - expected).abs().max().item() < tolerance * expected.abs().max().item()
    if quantize_activations:  # the rounding is visible, so the checks above tell rounded inputs from float ones
        unrounded = F.linear(x_in, weight_in, bias_in)
        assert (expected - unrounded).abs().max().item() > 1e-4 * unrounded.abs().max().item()


# --quantize int4 with the attention layers and output_layer in int8
MIXED = dict(quantize="int4", quantize_attention="int8", quantize_output_layer="int8")
QUANTIZE_OPTIONS = {"int8": dict(quantize="int8"), "int8 a8": dict(quantize="int8", quantize_activations="int8"),
                    "int4": dict(quantize="int4"), "int4 mixed": MIXED}


@pytest.mark.parametrize("quantize", QUANTIZE_OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_estimate_equals_the_loaded_model(wo_ckpt, quantize, dtype):
    """The meta model that the memory pre-flight counts holds exactly the bytes the loaded model does."""
    options = QUANTIZE_OPTIONS[quantize]
    config = ChatGLM2Config.from_dict(json.loads((wo_ckpt / "config.json").read_text()))
    specs = plan_layers(config, options["quantize"], 32, options.get("quantize_output_layer", "auto"), w8a8=False,
                        quantize_attention=options.get("quantize_attention", "auto"),
                        quantize_activations=options.get("quantize_activations"))
    with torch.device("meta"):
        meta = ChatGLM2ForCausalLM(config)
        use_weight_only_layers(meta, specs, dtype)
    loaded = load(wo_ckpt, dtype, group_size=32, **options)
    assert module_bytes(meta, dtype) == held_bytes(loaded, dtype)
    bf16_layers = module_bytes(load(wo_ckpt, dtype).transformer.encoder, torch.bfloat16)
    quantized_layers = held_bytes(loaded.transformer.encoder, dtype)
    assert quantized_layers < bf16_layers * {"int8": 0.55, "int8 a8": 0.55, "int4": 0.35, "int4 mixed": 0.45}[quantize] \
        * dtype.itemsize / 2


@pytest.mark.parametrize("quantize", QUANTIZE_OPTIONS)
@pytest.mark.parametrize("layout", ["bin", "safetensors"])
def test_quantize_at_load_computes_the_dequantized_weights(quantize, layout, wo_ckpt, wo_ckpt_safetensors, tmp_path):
    """Fast kernels and the portable path both compute what a float model of the dequantized weights (and the
    folded norms) computes (with the input rows of int8 layers rounded, under quantize_activations); transformers'
    GlmForCausalLM on those weights agrees too. The mixed model holds int8 attention layers and output_layer, int4
    MLPs."""
    ckpt = wo_ckpt if layout == "bin" else wo_ckpt_safetensors
    options = QUANTIZE_OPTIONS[quantize]
    with portable_kernels():
        portable = load(ckpt, group_size=32, **options)
    fast = load(ckpt, group_size=32, **options)
    int8_kernel = "fbgemm" if "quantize_activations" in options and HAS_FBGEMM else "cpu"
    for name, layer in fast.named_modules():
        if isinstance(layer, WeightOnlyLinear):
            int8 = options["quantize"] == "int8" or (quantize == "int4 mixed" and "mlp" not in name)
            assert (layer.bits, layer.kernel) == ((8, int8_kernel) if int8 else (4, "cpu")), name
    norm = portable.transformer.encoder.layers[0].input_layernorm.weight
    assert torch.equal(norm, torch.ones_like(norm))  # folded into query_key_value
    float_path = dequantized_copy(portable, ckpt, tmp_path / "dequantized")
    assert_same_function(fast, with_int8_inputs(load(float_path), fast), ckpt)
    assert_same_function(portable, with_int8_inputs(load(float_path), portable), ckpt)

    batch = ChatGLM2Tokenizer.from_pretrained(ckpt)(PROMPTS)
    real = batch["attention_mask"].bool()
    mask = batch["attention_mask"]
    with torch.no_grad():
        transformers_logits = glm_reference(float_path)(input_ids=batch["input_ids"], attention_mask=mask,
                                                        position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    if not rounds_inputs(portable):
        assert (portable(**batch)[real] - transformers_logits[real]).abs().max().item() < 1e-4
    assert (fast(**batch)[real] - load(ckpt)(**batch)[real]).abs().max().item() > 1e-4  # it does quantize


def test_thudm_checkpoint_computes_its_dequantized_weights(thudm_ckpt, tmp_path):
    """The float weights are unpacked here as chatglm.cpp's converter does (not with the project's code): high nibble
    first, sign-extended, times the row's scale."""
    config = json.loads((thudm_ckpt / "config.json").read_text())
    tensors = dict(iter_tensors(thudm_ckpt))
    floats = {}
    for name, tensor in tensors.items():
        if name.endswith("_scale"):
            continue
        if name + "_scale" in tensors:
            if config["quantization_bit"] == 4:
                low, high = ((tensor << 4) & 0xF0) >> 4, (tensor & 0xF0) >> 4
                tensor = torch.stack((high, low), dim=-1).view(tensor.shape[0], -1)
            tensor = tensor.float() * tensors[name + "_scale"].float()[:, None]
        floats[name] = tensor
    float_path = write_float_copy(floats, thudm_ckpt, tmp_path / "float")
    reference = load(float_path)
    # by default, as THUDM's runtime: the stored output_layer stays float (no further rounding of the logits)
    default = load(thudm_ckpt)
    assert not isinstance(default.transformer.output_layer, WeightOnlyLinear)
    batch = ChatGLM2Tokenizer.from_pretrained(thudm_ckpt)(PROMPTS)
    real = batch["attention_mask"].bool()
    cosine = torch.nn.functional.cosine_similarity(default(**batch)[real], reference(**batch)[real], dim=-1)
    assert cosine.min().item() >= 0.9999, cosine
    with portable_kernels():
        assert_same_function(load(thudm_ckpt), reference, thudm_ckpt)
    bits = f"int{config['quantization_bit']}"
    for options in ({}, {"quantize": bits}, *([{"quantize_activations": "int8"}] if bits == "int8" else [])):
        fast = load(thudm_ckpt, **options)
        assert_same_function(fast, with_int8_inputs(reference, fast), thudm_ckpt)
    # asked for, output_layer is quantized: the logits move
    head_int4 = load(thudm_ckpt, quantize_output_layer="int4")
    assert isinstance(head_int4.transformer.output_layer, WeightOnlyLinear)
    assert (head_int4(**batch)[real] - default(**batch)[real]).abs().max().item() > 1e-3


def test_default_int4_is_at_least_as_accurate_as_chatglm_cpp_q4_0(wo_ckpt, tmp_path):
    """Issue 20: on the same weights, the default int4 (groups of 32, asymmetric, integer zero) rounds every matrix
    closer than chatglm.cpp's Q4_0 (blocks of 32, symmetric), and the default load's logits are closer to float's
    than those of the model chatglm.cpp's converter makes (every matrix in Q4_0)."""
    tensors = dict(iter_tensors(wo_ckpt))
    for name, weight in tensors.items():
        if name.removesuffix(".weight").endswith((*ENCODER_LINEARS, "output_layer")):
            ours = dequantize(*quantize_int4(weight.float(), DEFAULT_GROUP_SIZE, torch.float32, CPU), 4, torch.float32)
            error, q4_0_error = (ours - weight).pow(2).mean(), (q4_0(weight.float()) - weight).pow(2).mean()
            assert error < q4_0_error, (name, error, q4_0_error)
    q4_0_model = load(write_float_copy({name: q4_0(tensor.float()) if tensor.dim() == 2 else tensor
                                        for name, tensor in tensors.items()}, wo_ckpt, tmp_path / "q4_0"))
    batch = ChatGLM2Tokenizer.from_pretrained(wo_ckpt)(PROMPTS)
    real = batch["attention_mask"].bool()
    reference = load(wo_ckpt)(**batch)[real]

    def cosine(model: ChatGLM2ForCausalLM) -> float:
        return F.cosine_similarity(model(**batch)[real], reference, dim=-1).mean().item()

    ours, peer = cosine(load(wo_ckpt, quantize="int4")), cosine(q4_0_model)
    assert ours >= peer, (ours, peer)


def test_bad_weight_only_input_is_refused(wo_ckpt, thudm_ckpt, tmp_path):
    def load_pretrained_from(path: Path, **options):
        return load_pretrained(ChatGLM2ForCausalLM, path, CPU, torch.float32, 0, 1, None, None, None, False, **options)

    with pytest.raises(InputError, match="quantization_bit to 3"):
        ChatGLM2Config.from_dict(dict(json.loads((wo_ckpt / "config.json").read_text()), quantization_bit=3))
    with pytest.raises(InputError, match="group size 256 does not divide the 128 input columns"):
        load(wo_ckpt, quantize="int4", group_size=256)
    with pytest.raises(InputError, match="is not one of 32, 64, 128, 256"):
        load(wo_ckpt, quantize="int4", group_size=48)
    with pytest.raises(InputError, match="unknown quantize='int3'"):
        load(wo_ckpt, quantize="int3")
    with pytest.raises(InputError, match="quantize_attention=int8 chooses .*; add --quantize"):
        load(wo_ckpt, quantize_attention="int8")
    with pytest.raises(InputError, match="THUDM checkpoints hold theirs already"):
        load(thudm_ckpt, quantize_attention="int8")
    with pytest.raises(InputError, match="rounds the activations of int8 layers and this model has none"):
        load(wo_ckpt, quantize="int4", quantize_activations="int8")
    with pytest.raises(InputError, match="unknown quantize_activations='int4'"):
        load(wo_ckpt, quantize="int8", quantize_activations="int4")
    with pytest.raises(InputError, match="two quantizations of the same layers"):
        load(wo_ckpt, quantize="int8", quant_path=tmp_path)
    with pytest.raises(InputError, match="two quantizations of the same layers"):
        load(thudm_ckpt, quant_path=tmp_path)
    other = "int8" if json.loads((thudm_ckpt / "config.json").read_text())["quantization_bit"] == 4 else "int4"
    with pytest.raises(InputError, match=f"--quantize {other} cannot requantize them"):
        load(thudm_ckpt, quantize=other)

    declared = tmp_path / "declared"  # a float checkpoint whose config.json claims THUDM's format
    shutil.copytree(wo_ckpt, declared)
    (declared / "config.json").write_text(json.dumps(dict(json.loads((wo_ckpt / "config.json").read_text()),
                                                          quantization_bit=4)))
    with pytest.raises(InputError, match="is torch.float16, but config.json's quantization_bit 4"):
        load_pretrained_from(declared)

    tensors = dict(iter_tensors(thudm_ckpt))
    scale = "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight_scale"
    tensors[scale] = torch.cat((tensors[scale], tensors[scale][:1]))
    bad = write_float_copy(tensors, thudm_ckpt, tmp_path / "bad_scale")
    (bad / "config.json").write_text((thudm_ckpt / "config.json").read_text())
    with pytest.raises(InputError, match=f"{scale} in .* has shape \\(129,\\) but config.json implies \\(128,\\)"):
        load_pretrained_from(bad)


@pytest.mark.slow
def test_every_main_mode_runs_weight_only(wo_ckpt, thudm_ckpt, tmp_path):
    flags = ["--model_path", str(wo_ckpt), "--quantize", "int4", "--group_size", "32"]
    single = main_py("--mode", "precision_single", *flags, "--batch", "2", "--quantize_attention", "int8",
                     MAX_SEQ_LEN="120")
    assert single.returncode == 0, single.stderr
    assert "int4 weight-only (group 32), attention int8, output_layer int4" in single.stdout
    assert len([line for line in single.stdout.splitlines() if line.startswith("[batch")]) == 2
    chat = main_py("--mode", "cli_demo", *flags, stdin="你好\nclear\n再见\n", MAX_SEQ_LEN="120")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("ChatGLM：") == 2

    dataset = write_calibration(tmp_path / "CEval" / "val" / "Social_Science" / "teacher_qualification.jsonl")
    ceval = main_py("--mode", "precision_dataset", *flags, "--ceval_dataset", str(dataset.parents[2]),
                    "--precision_output_file", str(tmp_path / "result.json"), CEVAL_MAX_NEW_TOKENS="4")
    assert ceval.returncode == 0, ceval.stderr
    assert json.loads((tmp_path / "result.json").read_text())

    csv = tmp_path / "performance.csv"
    performance = main_py("--mode", "performance", "--model_path", str(wo_ckpt), "--quantize", "int8",
                          "--quantize_activations", "int8", "--seqlen_in_pair", "16", "--seqlen_out_pair", "4",
                          "--performance_output_file", str(csv))
    assert performance.returncode == 0, performance.stderr
    assert "int8 weight-only, output_layer int8, int8 activations" in performance.stdout
    assert len(csv.read_text().splitlines()) == 2

    thudm = main_py("--mode", "precision_single", "--model_path", str(thudm_ckpt), MAX_SEQ_LEN="120")
    assert thudm.returncode == 0, thudm.stderr
    assert "weight-only" in thudm.stdout and "output_layer float" in thudm.stdout


@pytest.mark.slow
def test_web_demo_serves_a_weight_only_model(wo_ckpt, tmp_path):
    from gradio_client import Client

    port = free_port()
    log = tmp_path / "server.log"
    process = start_server(["web_demo.py", "--model_path", str(wo_ckpt), "--server_port", str(port), "--quantize",
                            "int8"], port, log, MAX_SEQ_LEN="256", GRADIO_ANALYTICS_ENABLED="False")
    try:
        chatbot = Client(f"http://127.0.0.1:{port}/").predict("你好", [], 64, 0.8, 0.95, api_name="/chat")
        content = chatbot[-1]["content"]
        assert content if isinstance(content, str) else "".join(part.get("text", "") for part in content)
    finally:
        assert stop(process) == 0, log.read_text()[-3000:]
    assert "int8 weight-only" in log.read_text()


@pytest.mark.slow
def test_bad_weight_only_flags_give_one_line(wo_ckpt, thudm_ckpt, tmp_path):
    args = ["--mode", "precision_single", "--model_path", str(wo_ckpt)]
    assert_one_line_error(main_py(*args, "--quantize", "int4", "--group_size", "256"),
                          "group size 256 does not divide the 128 input columns")
    assert_one_line_error(main_py(*args, "--quantize", "int4", "--group_size", "48"), "--group_size", "invalid choice")
    assert_one_line_error(main_py(*args, "--quantize", "int8", **quant_env(tmp_path)), "two quantizations")
    bad_bits = tmp_path / "bits"
    shutil.copytree(thudm_ckpt, bad_bits)
    (bad_bits / "config.json").write_text(json.dumps(dict(json.loads((thudm_ckpt / "config.json").read_text()),
                                                          quantization_bit=3)))
    assert_one_line_error(main_py("--mode", "precision_single", "--model_path", str(bad_bits)), "quantization_bit to 3")


@pytest.mark.slow
def test_tensor_parallel_weight_only_matches_one_process(wo_ckpt, thudm_ckpt, tmp_path):
    """THUDM's checkpoints cut by process_weights.py (weight rows or columns, weight_scale with the rows), and float
    parts quantized per rank at load (int4 groups never straddle ranks, so the quantization is the same)."""
    thudm = tmp_path / "thudm"
    shutil.copytree(thudm_ckpt, thudm)
    assert process_weights(thudm, 2).returncode == 0
    config = ChatGLM2Config.from_dict(json.loads((thudm / "config.json").read_text()))
    parts = [dict(iter_tensors(part_root(thudm, 2) / str(rank))) for rank in range(2)]
    for name, tensor in iter_tensors(thudm):
        if not name.endswith("inv_freq"):
            assert torch.equal(join_tensor(name, [part[name] for part in parts], config), tensor), name
    assert_torchrun_matches(load(thudm), thudm, 2, tmp_path)
    if json.loads((thudm / "config.json").read_text())["quantization_bit"] == 8:  # row maxima over the ranks
        options = {"quantize_activations": "int8"}
        assert_torchrun_matches(load(thudm, **options), thudm, 2, tmp_path, options)

    ckpt = tmp_path / "float"
    shutil.copytree(wo_ckpt, ckpt)
    assert process_weights(ckpt, 2).returncode == 0
    options = {"quantize": "int4", "group_size": 32}
    assert_torchrun_matches(load(ckpt, **options), ckpt, 2, tmp_path, options)

    flags = ["--mode", "precision_single", "--model_path", str(ckpt), "--batch", "2", "--dtype", "fp32", "--quantize",
             "int4", "--group_size", "32"]
    single = main_py(*flags, MAX_SEQ_LEN="160")
    parallel = torchrun(2, "main.py", *flags, "--tp_size", "2", MAX_SEQ_LEN="160")
    assert single.returncode == 0 and parallel.returncode == 0, parallel.stderr[-3000:]
    answers = [line for line in parallel.stdout.splitlines() if line.startswith("[batch")]
    assert len(answers) == 2 and answers == [line for line in single.stdout.splitlines() if line.startswith("[batch")]


PEAK_RSS_SCRIPT = """
import sys, torch
from modeling_chatglm_ascend import ChatGLM2ForCausalLM
def status(field):
    return [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field)][0]
before = status("VmRSS")
ChatGLM2ForCausalLM.from_pretrained(sys.argv[1], device="cpu", dtype=torch.bfloat16, max_seq_len=64,
                                    quantize=sys.argv[2] if len(sys.argv) > 2 else None)
print(status("VmHWM") - before)
"""


@pytest.mark.slow
def test_quantizing_while_loading_never_holds_the_float_model(tmp_path):
    """The peak RSS that loading adds with --quantize int4 is below the float model's bf16 bytes (and below what
    loading the float model adds by most of them): each tensor is quantized as it streams in."""
    ckpt = write_demo_checkpoint(tmp_path / "ckpt", num_layers=12, hidden_size=1024, ffn_hidden_size=3456,
                                 num_attention_heads=8, num_shards=6)
    float_bytes = sum(tensor.numel() * 2 for _, tensor in iter_tensors(ckpt))
    peaks = {}
    for quantize in (None, "int4"):
        result = run("-c", PEAK_RSS_SCRIPT, str(ckpt), *([quantize] if quantize else []))
        assert result.returncode == 0, result.stderr
        peaks[quantize] = int(result.stdout.split()[-1])
    assert peaks["int4"] < float_bytes and peaks["int4"] < peaks[None] - float_bytes // 2, (peaks, float_bytes)


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_compiled_decode_step_uses_the_weight_only_layers(wo_ckpt, quantize):
    """The inductor-compiled decode step (what CUDA runs in graphs) gives the eager tokens, fp32 on the CPU."""
    batch = ChatGLM2Tokenizer.from_pretrained(wo_ckpt)(PROMPTS)
    eager = load(wo_ckpt, quantize=quantize, group_size=32, compile="off")
    compiled = load(wo_ckpt, quantize=quantize, group_size=32, compile="on")
    assert torch.equal(compiled.generate(**batch, max_new_tokens=8), eager.generate(**batch, max_new_tokens=8))
