"""openai_api.py end to end: the real server on a random checkpoint, driven by the official `openai` client."""
import json
import threading
import time
import urllib.request

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatglm2.tensor_parallel import write_tp_parts
from chatglm2.tokenizer import ChatGLM2Tokenizer
from helpers import free_port, kill_all, rank0_pid, start_server, stop, torchrun_args

pytestmark = pytest.mark.slow  # every test here talks to a server process

KEY = "test-key"
# fp32 so that greedy answers are exactly reproducible; prompts longer than 16 tokens are prefilled in chunks.
SERVER = ["--dtype", "fp32", "--max_batch", "4", "--api_key", KEY, "--max_waiting", "32", "--max_prefill_tokens", "16"]


def server_command(model_path, port: int, *extra: str) -> list[str]:
    return ["openai_api.py", "--model_path", str(model_path), "--server_port", str(port), *SERVER, *extra]


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("openai") / "server.log"
    process = start_server(server_command(tiny_ckpt, port), port, log, path="/health", MAX_SEQ_LEN="2048")
    yield f"http://127.0.0.1:{port}"
    assert stop(process) == 0, log.read_text()[-3000:]


def client(server: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0)


def health(server: str) -> dict:
    with urllib.request.urlopen(f"{server}/health", timeout=10) as response:
        return json.loads(response.read())


def chat(server: str, content: str, **settings) -> openai.types.chat.ChatCompletion:
    settings = {"max_tokens": 12, "temperature": 0, **settings}
    return client(server).chat.completions.create(model="chatglm2-6b", messages=[{"role": "user", "content": content}],
                                                  **settings)


def test_chat_plain_and_streamed_agree(server):
    assert [m.id for m in client(server).models.list()] == ["chatglm2-6b"]
    answer = chat(server, "你好")
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length" and answer.usage.completion_tokens == 12
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 12
    chunks = list(client(server).chat.completions.create(
        model="chatglm2-6b", messages=[{"role": "user", "content": "你好"}], max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_multi_turn_with_a_system_message_is_chatglm2s_prompt(server, tiny_ckpt):
    messages = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "讲个笑话"}]
    answer = client(server).chat.completions.create(model="m", messages=messages, max_tokens=10, temperature=0)
    prompt = ChatGLM2Tokenizer.from_pretrained(tiny_ckpt).build_prompt("讲个笑话", [("你是助手。你好", "你好！")])
    raw = client(server).completions.create(model="m", prompt=prompt, max_tokens=10, temperature=0)
    assert raw.object == "text_completion" and answer.choices[0].message.content == raw.choices[0].text.lstrip()
    assert answer.usage.prompt_tokens == raw.usage.prompt_tokens


def test_n_seed_stop_and_max_tokens(server):
    sampled = chat(server, "Write a poem", n=3, temperature=1.2, seed=5)
    again = chat(server, "Write a poem", n=3, temperature=1.2, seed=5)
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert [c.message.content for c in sampled.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in sampled.choices}) > 1
    greedy = chat(server, "Write a poem", max_tokens=30).choices[0].message.content
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 2]
    stopped = chat(server, "Write a poem", max_tokens=30, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.message.content == greedy[:greedy.index(stop)]
    streamed = client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": "Write a poem"}],
                                                      max_tokens=30, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == stopped.message.content


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    cases = [("{not json", "not valid JSON"), (json.dumps({"model": "m"}), "messages"),
             (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}), "temperature"),
             (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 9}), "at most 4"),
             (json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}), "last message"),
             (json.dumps({"messages": [{"role": "user", "content": "你好" * 3000}]}), "MAX_SEQ_LEN=2048")]
    for body, fragment in cases:
        response = httpx.post(f"{server}/v1/chat/completions", content=body, headers=headers, timeout=30)
        error = response.json()["error"]
        assert response.status_code == 400 and fragment in error["message"], (body[:40], error)
        assert error["type"] == "invalid_request_error" and "Traceback" not in response.text
    with pytest.raises(openai.BadRequestError, match="MAX_SEQ_LEN"):
        chat(server, "hi", max_tokens=5000)
    assert chat(server, "你好").choices[0].message.content


def test_sixteen_clients_at_once_get_their_alone_answers(server):
    prompts = [f"问题 {i}: " + "天气" * (i % 5) for i in range(16)]
    alone = [chat(server, prompt, max_tokens=8 + i % 7).choices[0].message.content for i, prompt in enumerate(prompts)]
    together = [None] * 16

    def ask(i: int) -> None:
        together[i] = chat(server, prompts[i], max_tokens=8 + i % 7).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert together == alone
    assert chat(server, "你好").choices[0].message.content


def test_a_client_that_leaves_cancels_its_request(server):
    cancelled = health(server)["finished"].get("cancelled", 0)
    stream = client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": "讲个长故事"}],
                                                    max_tokens=1900, temperature=0, stream=True)
    for _, _ in zip(range(3), stream):
        pass
    stream.close()
    deadline = time.monotonic() + 30
    while health(server)["finished"].get("cancelled", 0) == cancelled and time.monotonic() < deadline:
        time.sleep(0.2)
    assert health(server)["finished"].get("cancelled", 0) == cancelled + 1 and health(server)["running"] == 0
    assert health(server)["kv_cache"]["blocks_used"] == 0  # its blocks are back in the pool


def test_the_conversation_so_far_is_found_in_the_cache(server, tiny_ckpt, tmp_path):
    messages = [{"role": "user", "content": "请介绍一下长城的历史。" * 5}]
    first = client(server).chat.completions.create(model="m", messages=messages, max_tokens=24, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "再详细一点"}]
    second = client(server).chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0)
    # all of the first turn's prompt but the block where it and the second may tokenize apart
    assert second.usage.prompt_tokens_details.cached_tokens >= (first.usage.prompt_tokens // 16 - 1) * 16
    with urllib.request.urlopen(f"{server}/metrics", timeout=10) as response:
        metrics = {sample.name + str(sample.labels): sample.value
                   for family in text_string_to_metric_families(response.read().decode()) for sample in family.samples}
    pool = health(server)["kv_cache"]
    assert metrics["chatglm2_prefix_cache_hit_tokens_total{}"] == pool["hit_tokens"] > 0
    assert sum(metrics[f"chatglm2_kv_cache_blocks{{'state': '{state}'}}"] for state in ("used", "cached", "free")) \
        == pool["blocks"] and metrics["chatglm2_num_requests_running{}"] == 0
    port = free_port()
    cold = start_server(server_command(tiny_ckpt, port, "--no_prefix_caching", "--kv_cache_memory", "0.002"), port,
                        tmp_path / "cold.log", path="/health", MAX_SEQ_LEN="2048")
    try:
        # 0.2% of the free memory, not --max_batch x MAX_SEQ_LEN (the other server's 512 blocks)
        assert health(f"http://127.0.0.1:{port}")["kv_cache"]["blocks"] not in (0, pool["blocks"])
        again = client(f"http://127.0.0.1:{port}").chat.completions.create(model="m", messages=messages, max_tokens=12,
                                                                           temperature=0)
        assert again.choices[0].message.content == second.choices[0].message.content
        assert again.usage.prompt_tokens_details.cached_tokens == 0
    finally:
        assert stop(cold) == 0, (tmp_path / "cold.log").read_text()[-3000:]


def test_torchrun_tp2_serves_the_same_answers(server, tiny_ckpt, tmp_path):
    split = tmp_path / "tp2"
    write_tp_parts(tiny_ckpt, 2, split, show_progress=False)
    port = free_port()
    log = tmp_path / "tp.log"
    process = start_server([*torchrun_args(2), *server_command(split, port, "--tp_size", "2")], port, log,
                           path="/health", MAX_SEQ_LEN="2048")
    try:
        tp_server = f"http://127.0.0.1:{port}"
        results = {}
        threads = [threading.Thread(target=lambda p=p: results.__setitem__(p, chat(tp_server, p))) for p in
                   ("你好", "讲个笑话", "1+1=?")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        for prompt, answer in results.items():
            assert answer.choices[0].message.content == chat(server, prompt).choices[0].message.content
        assert stop(process, pid=rank0_pid(process)) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            kill_all(process)
