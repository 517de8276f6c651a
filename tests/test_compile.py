"""The compiled decode step (inductor's CPU backend here; CUDA graphs on a GPU) against the eager one."""
import pytest
import torch

from chatglm2.compiled import MIN_KEY_BUCKET, bucket, buckets, compile_enabled
from chatglm2.engine import Engine, SamplingParams
from helpers import PROMPTS, main_py, pool_workload, process_weights, torchrun
from modeling_chatglm_ascend import ChatGLM2ForCausalLM, ChatGLM2Tokenizer


def test_buckets_and_the_auto_mode():
    assert buckets(1) == [1] and buckets(4) == [1, 2, 4] and buckets(6) == [1, 2, 4, 6]
    assert buckets(2048, MIN_KEY_BUCKET) == [128, 256, 512, 1024, 2048] and buckets(80, MIN_KEY_BUCKET) == [80]
    assert bucket([128, 256, 300], 129) == 256 and bucket([128, 256, 300], 257) == 300
    assert compile_enabled("auto", torch.device("cuda")) and not compile_enabled("auto", torch.device("cpu"))
    assert compile_enabled("on", torch.device("cpu")) and not compile_enabled("off", torch.device("cuda"))


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_tokens(tiny_ckpt):
    tokenizer = ChatGLM2Tokenizer.from_pretrained(tiny_ckpt)
    eager = ChatGLM2ForCausalLM.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32, max_seq_len=128)
    compiled = ChatGLM2ForCausalLM.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32, max_seq_len=128,
                                                   compile="on")
    batch = tokenizer(PROMPTS[:2])
    assert torch.equal(compiled.generate(**batch, max_new_tokens=10), eager.generate(**batch, max_new_tokens=10))
    assert compiled.compiled_decode is not None and eager.compiled_decode is None
    # Requests that join and leave: rows at different positions, idle rows in between, the bucket of 2 padded.
    results = []
    for model in (eager, compiled):
        engine = Engine(model, 2)
        prompts = [tokenizer.encode(p) for p in PROMPTS]
        requests = [engine.submit(prompts[0], SamplingParams(max_new_tokens=3))]
        engine.step()
        requests += [engine.submit(ids, SamplingParams(max_new_tokens=6)) for ids in prompts[1:]]
        while not all(r.finished for r in requests):
            engine.step()
        results.append([r.tokens for r in requests])
    assert results[0] == results[1]
    # a small pool: requests preempted and recomputed, prefixes found cached, block tables through the compiled step
    assert pool_workload(compiled, tokenizer) == pool_workload(eager, tokenizer)


@pytest.mark.slow
def test_compiled_equals_eager_under_torchrun_tp2(tiny_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert process_weights(tiny_ckpt, 2, "--output_path", str(ckpt)).returncode == 0
    answers = []
    for compile_mode in ("off", "on"):
        result = torchrun(2, "main.py", "--mode", "precision_single", "--model_path", str(ckpt), "--tp_size", "2",
                          "--dtype", "fp32", "--compile", compile_mode, MAX_SEQ_LEN="80")
        assert result.returncode == 0, result.stderr[-3000:]
        answers.append([line for line in result.stdout.splitlines() if line.startswith("[batch")])
    single = main_py("--mode", "precision_single", "--model_path", str(tiny_ckpt), "--dtype", "fp32", MAX_SEQ_LEN="80")
    assert answers[0] == answers[1] == [line for line in single.stdout.splitlines() if line.startswith("[batch")]


@pytest.mark.slow
def test_compiled_decode_reads_the_smallest_key_bucket_that_holds_the_context(tiny_ckpt):
    """Issue 21: a step attends over 128, 256, ... keys as the context grows, not over MAX_SEQ_LEN, and gives the
    eager tokens across every bucket boundary."""
    tokenizer = ChatGLM2Tokenizer.from_pretrained(tiny_ckpt)
    short = tokenizer.encode(PROMPTS[0])
    long = (tokenizer.encode(" ".join(PROMPTS)) * 20)[:200]
    params = [SamplingParams(max_new_tokens=150, ignore_eos=True), SamplingParams(max_new_tokens=100, ignore_eos=True)]
    results = []
    for compile_mode in ("off", "on"):
        model = ChatGLM2ForCausalLM.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32, max_seq_len=320,
                                                    compile=compile_mode)
        engine = Engine(model, 2)
        requests = [engine.submit(ids, p) for ids, p in zip((short, long), params)]
        steps = []
        if model.compiled_decode is not None:
            run = model.compiled_decode.run
            model.compiled_decode.run = lambda rows, keys: steps.append((rows, keys)) or run(rows, keys)
        while not all(r.finished for r in requests):
            engine.step()
        results.append([r.tokens for r in requests])
    assert results[0] == results[1]
    assert model.compiled_decode.key_buckets == [128, 256, 320]
    # the long prompt sits at 200..299, so every step with both rows reads 256 keys, then 320
    assert steps[0] == (2, 256) and (2, 320) in steps and all(keys < 320 for _, keys in steps[:55])
    assert len(steps) == 149  # one decode step per token after each prefill's first
