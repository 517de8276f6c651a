"""What the tests share: the tiny model's shape, running the project's commands as a user does, and servers."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Enough heads and KV groups for tensor parallel 2 and 4; small enough for CI's 2 cores.
TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=8, kv_channels=16,
            multi_query_group_num=2)
PROMPTS = ["你好", "今天天气怎么样？请问明天会下雨吗", "Write a short poem about the sea.", "1+1=?"]


def run_env(**extra: str) -> dict:
    """Environment for subprocesses of the commands under test: the project and the tests importable, and none of
    the seed's variables unless given."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("MAX_SEQ_LEN", "ENABLE_QUANT", "ENABLE_SPARSE", "QUANT_WEIGHT_PATH", "COMPRESS_WEIGHT_PATH")}
    return dict(env, PYTHONUNBUFFERED="1", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **extra)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(*args: str, stdin: str | None = None, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`python ARGS...` in the project folder, as a user runs a command."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=run_env(**env))


def main_py(*args: str, stdin: str | None = None, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return run("main.py", *args, stdin=stdin, timeout=timeout, **env)


def torchrun_args(nproc: int) -> list[str]:
    return ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port())]


def torchrun(nproc: int, *args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess:
    return run(*torchrun_args(nproc), *args, stdin=stdin, **env)


def process_weights(model_path: Path, tp_size: int, *extra: str, **env: str) -> subprocess.CompletedProcess:
    return run("process_weights.py", "--model_path", str(model_path), "--tp_size", str(tp_size), *extra, **env)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 2, no traceback, and the last stderr line (after any progress bar) is the only error line."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and [line for line in lines if line.startswith("error: ")] == lines[-1:], \
        result.stderr
    for fragment in fragments:
        assert fragment in lines[-1]


def start_server(command: list[str], port: int, log: Path, path: str = "/", **env: str) -> subprocess.Popen:
    """Start `python COMMAND...` in its own process group (see kill_all); return once http://127.0.0.1:port/path
    answers."""
    process = subprocess.Popen([sys.executable, *command], cwd=ROOT, env=run_env(**env), stdout=log.open("w"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5)
            return process
        except OSError:
            time.sleep(0.5)
    kill_all(process)
    pytest.fail(f"server did not start in 120 s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen, pid: int | None = None) -> int:
    """SIGTERM to `pid` (default: the process), as torchrun or a service manager sends; the exit status."""
    os.kill(pid or process.pid, signal.SIGTERM)
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        kill_all(process)
        raise


def kill_all(process: subprocess.Popen) -> None:
    """The process and whatever it started (torchrun's workers outlive a killed torchrun)."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def rank0_pid(torchrun_process: subprocess.Popen) -> int:
    """The worker that torchrun started with RANK=0 (the one serving)."""
    for pid in Path(f"/proc/{torchrun_process.pid}/task/{torchrun_process.pid}/children").read_text().split():
        environ = Path(f"/proc/{pid}/environ").read_text(errors="replace").split("\0")
        if "RANK=0" in environ:
            return int(pid)
    raise AssertionError("torchrun has no RANK=0 worker")


def assert_torchrun_matches(model, model_path: Path, tp_size: int, out_dir: Path, load_kwargs: dict | None = None,
                            **env: str) -> None:
    """tests/tp_worker.py at tp_size under torchrun (with `env`, and `load_kwargs` for from_pretrained): rank 0's
    logits and greedy tokens equal `model`'s (the same weights in one process), and every rank got the same greedy and
    sampled tokens."""
    import json

    import torch

    from chatglm2.tokenizer import load_tokenizer

    result = torchrun(tp_size, "tests/tp_worker.py", str(model_path), str(tp_size), str(out_dir),
                      json.dumps(load_kwargs or {}), **env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(tp_size)]
    tokenizer = load_tokenizer(model_path)
    batch = tokenizer(PROMPTS)
    real = batch["attention_mask"].bool()
    assert (ranks[0]["logits"][real] - model(**batch)[real]).abs().max().item() < 1e-4
    assert torch.equal(ranks[0]["greedy"], model.generate(**batch, max_new_tokens=12))
    assert ranks[0]["pool"] == pool_workload(model, tokenizer)[0]
    assert ranks[0]["preemptions"] > 0
    for other in ranks[1:]:
        assert torch.equal(other["greedy"], ranks[0]["greedy"])
        assert torch.equal(other["sampled"], ranks[0]["sampled"])
        assert other["pool"] == ranks[0]["pool"]


def pool_workload(model, tokenizer) -> tuple[list[list[int]], int]:
    """Greedy answers through a KV pool too small to hold them all at once (so requests are preempted), with
    prompts that share prefixes (prefix hits) and chunked prefill: each request's tokens, and the preemptions."""
    from chatglm2.engine import Engine, SamplingParams
    from chatglm2.generation import chat_input

    engine = Engine(model, 4, max_prefill_tokens=24, kv_cache_tokens=96)
    prompts = [chat_input(tokenizer, p, []) for p in PROMPTS]
    requests = [engine.submit(ids, SamplingParams(max_new_tokens=12)) for ids in prompts + [p * 2 for p in prompts]]
    while not all(r.finished for r in requests):
        engine.step()
    return [r.tokens for r in requests], engine.preemptions


# W8A8 and sparse: the tiny model's quantized layers (layer 0 is the seed's float_layers_id) and calibration data.
LAYERS = [f"transformer.encoder.layers.1.{name}" for name in
          ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")]
QUESTIONS = ["教师职业道德的核心是____。\nA. 爱岗敬业\nB. 关爱学生\nC. 教书育人\nD. 为人师表",
             "我国第一部教育学著作是____。\nA. 《学记》\nB. 《论语》\nC. 《大学》\nD. 《中庸》",
             "今天天气晴朗，适合户外活动，那么学生课外活动的组织形式不包括____。\nA. 群众性活动\nB. 小组活动\nC. 个人活动\nD. 考试"]


def quant_env(quant_dir: Path) -> dict:
    return {"ENABLE_QUANT": "1", "QUANT_WEIGHT_PATH": str(quant_dir)}


def write_calibration(path: Path) -> Path:
    """A C-Eval jsonl file of QUESTIONS."""
    import json

    lines = [json.dumps({"inputs_pretokenized": q, "label": i % 4}, ensure_ascii=False) for i, q in enumerate(QUESTIONS)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def assert_single_and_chat_run(ckpt: Path, env: dict) -> None:
    """precision_single answers both batch rows and cli_demo both turns, with the given environment."""
    single = main_py("--mode", "precision_single", "--model_path", str(ckpt), "--batch", "2", MAX_SEQ_LEN="120", **env)
    assert single.returncode == 0, single.stderr
    assert len([line for line in single.stdout.splitlines() if line.startswith("[batch")]) == 2
    chat = main_py("--mode", "cli_demo", "--model_path", str(ckpt), stdin="你好\nclear\n再见\n", MAX_SEQ_LEN="120", **env)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("ChatGLM：") == 2


def force_answers(model, answer_for) -> list[list[int]]:
    """Make `model` answer each request with the token ids answer_for(prompt ids it prefills) returns (ending with a
    stop token), by forcing its logits: tokenizer, engine, sampler and servers run as usual. One request at a time,
    each prefilled in one piece. Returns the list of prompts seen, which grows as requests come."""
    import torch

    prefill, logits = model.prefill, model.logits
    prompts, script = [], []

    def forced_prefill(pieces, block_tables, starts=None):
        assert len(pieces) == 1, "one request at a time"
        prompts.append(list(pieces[0]))
        script[:] = answer_for(list(pieces[0]))
        return prefill(pieces, block_tables, starts)

    def forced_logits(hidden):
        forced = torch.full_like(logits(hidden), -1e4)
        forced[:, script.pop(0)] = 1e4
        return forced

    model.prefill, model.logits = forced_prefill, forced_logits
    return prompts
