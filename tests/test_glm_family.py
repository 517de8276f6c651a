"""ChatGLM3-6B and GLM-4-9B-chat checkpoints (random weights, the real files' layout and tokenizers): parity with
transformers' GlmForCausalLM, transformers' own layout of the same weights, chat formats and stop tokens, and every
command on each."""
import json
import re
import shutil
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import openai
import pytest
import torch
import uvicorn
from playwright.sync_api import expect, sync_playwright

from chatglm2.checkpoint import iter_tensors
from chatglm2.engine import Engine
from chatglm2.errors import InputError
from chatglm2.glm4_tokenizer import GLM4Tokenizer
from chatglm2.random_checkpoint import write_demo_checkpoint
from chatglm2.openai_server import ApiError, ChatRequest, OpenAIServer, build_app, chat_prompt
from chatglm2.tensor_parallel import write_tp_parts
from chatglm2.tokenizer import MODEL_NAMES, ChatGLM2Tokenizer, ChatGLM3Tokenizer, load_tokenizer
from chatglm2.tool_calls import chat_messages
from helpers import (PROMPTS, TINY, assert_single_and_chat_run, assert_torchrun_matches, force_answers, free_port,
                     main_py, process_weights, quant_env, run, start_server, stop, write_calibration)
from modeling_chatglm_ascend import ChatGLM2ForCausalLM
from reference_glm import glm_reference
from test_web_demo import CHROMIUM, CHROMIUM_FLAGS

FAMILIES = ["chatglm3", "glm4"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_ckpt(request, tmp_path_factory):
    """(family, a 2-layer random checkpoint of its files)."""
    return request.param, write_demo_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", num_shards=2,
                                                family=request.param, **TINY)


@pytest.fixture(scope="module")
def glm4_ckpt(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("glm4") / "ckpt", num_shards=3, safetensors=True,
                                 family="glm4", seed=2, **TINY)


def fp32(path, **kwargs) -> ChatGLM2ForCausalLM:
    return ChatGLM2ForCausalLM.from_pretrained(path, device="cpu", dtype=torch.float32, **kwargs)


def test_the_tokenizer_is_chosen_by_the_checkpoint_files(tiny_ckpt, family_ckpt):
    family, path = family_ckpt
    assert type(load_tokenizer(tiny_ckpt)) is ChatGLM2Tokenizer
    assert type(load_tokenizer(path)) is {"chatglm3": ChatGLM3Tokenizer, "glm4": GLM4Tokenizer}[family]


def test_chatglm3_role_tokens_follow_the_special_tokens_and_cannot_be_typed(tmp_path_factory):
    path = write_demo_checkpoint(tmp_path_factory.mktemp("c3tok") / "ckpt", family="chatglm3", **TINY)
    tokenizer = load_tokenizer(path)
    n = tokenizer.n_words  # the released ChatGLM3 tokenizer: n = 64789, so <|user|> = 64795
    assert [tokenizer.get_command(t) for t in ("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>",
                                               "<|observation|>")] == [n + 1, n + 3, n + 5, n + 6, n + 7, n + 8]
    assert tokenizer.chat_stop_ids == (2, n + 6, n + 8)
    messages = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "<|user|>你好"}]
    ids = tokenizer.build_chat_input(messages)
    sp = tokenizer.sp
    # THUDM's build_single_message: role token, encode(f"{metadata}\n"), encode(content); then <|assistant|>
    assert ids == [n + 1, n + 3, n + 5, *sp.encode("\n"), *sp.encode("你是助手"), n + 6, *sp.encode("\n"),
                   *sp.encode("<|user|>你好"), n + 7]
    assert ids.count(n + 6) == 1  # the typed "<|user|>" is text, not a turn
    assert tokenizer.decode(ids) == sp.decode(sp.encode("\n") + sp.encode("你是助手") + sp.encode("\n") +
                                              sp.encode("<|user|>你好"))


def test_logits_and_greedy_tokens_match_reference(family_ckpt, glm4_ckpt):
    family, path = family_ckpt
    for path in [path] + ([glm4_ckpt] if family == "glm4" else []):
        tokenizer, ours, reference = load_tokenizer(path), fp32(path), glm_reference(path)
        batch = tokenizer(PROMPTS)
        mask = batch["attention_mask"]
        logits = ours(**batch)
        with torch.no_grad():
            expected = reference(input_ids=batch["input_ids"], attention_mask=mask,
                                 position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        assert (logits[mask.bool()] - expected[mask.bool()]).abs().max().item() <= 1e-4
        eos = ours.config.eos_token_ids
        output = ours.generate(**batch, max_new_tokens=16)
        with torch.no_grad():
            greedy = reference.generate(**batch, max_new_tokens=16, do_sample=False, eos_token_id=list(eos),
                                        pad_token_id=ours.config.pad_token_id)[:, batch["input_ids"].shape[1]:]
        assert torch.equal(output, greedy)


def test_transformers_layout_is_read_as_the_same_model(glm4_ckpt, tmp_path):
    """GlmForCausalLM.save_pretrained's folder (transformers' config.json and q/k/v names, as THUDM's -hf repositories)
    loads as the same model, and process_weights.py cuts it into the same parts."""
    hf = tmp_path / "glm-4-9b-chat-hf"
    glm_reference(glm4_ckpt).save_pretrained(hf)
    (hf / "tokenizer.json").write_text("{}", encoding="utf-8")  # what the -hf repositories ship instead
    with pytest.raises(InputError, match="copy tokenizer.model and tokenizer_config.json"):
        load_tokenizer(hf)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(glm4_ckpt / name, hf / name)
    assert json.loads((hf / "config.json").read_text())["model_type"] == "glm"
    batch = load_tokenizer(hf)(PROMPTS)
    hf_model, model = fp32(hf), fp32(glm4_ckpt)
    assert hf_model.config == model.config
    assert torch.equal(hf_model(**batch), model(**batch))
    parts = [write_tp_parts(source, 2, tmp_path / f"tp_{source.name}", show_progress=False) for source in (hf, glm4_ckpt)]
    for rank in range(2):
        ours, theirs = (dict(iter_tensors(p / str(rank))) for p in parts)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_chat_turns_use_role_messages_and_stop_at_end_of_turn_tokens(family_ckpt):
    family, path = family_ckpt
    tokenizer, model = load_tokenizer(path), fp32(path)
    end_of_turn = tokenizer.get_command("<|user|>")
    # answer as the model was trained to: the tokens its format writes for this turn (header newline included)
    system = [{"role": "system", "content": "你是一个助手。"}]
    asked = tokenizer.build_chat_input(system + [{"role": "user", "content": "你好"}])
    turn = tokenizer.build_chat_input(system + [{"role": "user", "content": "你好"},
                                                {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "."}])
    answer = turn[len(asked):turn.index(end_of_turn, len(asked))]
    prompts = force_answers(model, lambda prompt: answer + [end_of_turn, *answer])  # what follows the stop is unseen
    response, history = model.chat(tokenizer, "你好", [], system="你是一个助手。")
    assert response == "你好！"
    assert history == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    assert prompts[-1] == asked
    response, history = model.chat(tokenizer, "再见", system + history)
    assert response == "你好！" and len(history) == 5
    # the second turn's prompt continues the first turn's (its cached blocks are reused, the rest prefilled)
    whole = tokenizer.build_chat_input(history[:4])
    assert len(prompts[-1]) < len(whole) and whole[-len(prompts[-1]):] == prompts[-1]


def test_every_mode_runs(family_ckpt, tmp_path):
    from test_ceval import write_jsonl_dataset

    family, path = family_ckpt
    assert_single_and_chat_run(path, {})
    performance = main_py("--mode", "performance", "--model_path", str(path), "--seqlen_in_pair", "16",
                          "--seqlen_out_pair", "4", "--performance_output_file", str(tmp_path / "perf.csv"))
    assert performance.returncode == 0, performance.stderr
    dataset = write_jsonl_dataset(tmp_path / "CEval")
    ceval = main_py("--mode", "precision_dataset", "--model_path", str(path), "--ceval_dataset", str(dataset),
                    "--batch", "4", "--precision_output_file", str(tmp_path / "ceval.json"), MAX_SEQ_LEN="1024",
                    CEVAL_MAX_NEW_TOKENS="32")  # random GLM-4 answers re-encode to ~6x their tokens in stage 2
    assert ceval.returncode == 0, ceval.stderr[-2000:]
    assert "C-Eval val accuracy" in ceval.stdout


@pytest.mark.parametrize("how", ["int4", "int8", "w8a8"])
def test_quantized_weights_answer(family_ckpt, how, tmp_path):
    family, path = family_ckpt
    if how == "w8a8":
        calibration = write_calibration(tmp_path / "calib.jsonl")
        export = run("export_quant_weight.py", "--float_weight", str(path), "--data_path", str(calibration),
                     "--quant_weight", str(tmp_path / "quant"))
        assert export.returncode == 0, export.stderr[-2000:]
        split = process_weights(path, 1, **quant_env(tmp_path / "quant"))
        assert split.returncode == 0, split.stderr[-2000:]
        single = main_py("--mode", "precision_single", "--model_path", str(path), MAX_SEQ_LEN="120",
                         **quant_env(tmp_path / "quant"))
    else:
        single = main_py("--mode", "precision_single", "--model_path", str(path), "--quantize", how,
                         MAX_SEQ_LEN="120")
    assert single.returncode == 0, single.stderr[-2000:]
    assert "[batch 0] 答：" in single.stdout


@pytest.mark.slow
def test_tensor_parallel_2_equals_1(family_ckpt, tmp_path):
    family, path = family_ckpt
    result = process_weights(path, 2)
    assert result.returncode == 0, result.stderr
    assert_torchrun_matches(fp32(path), path, 2, tmp_path)


@contextmanager
def openai_server_thread(engine, tokenizer) -> Iterator[openai.OpenAI]:
    """openai_api.py's app and engine thread in this process (so that the test can force the model's logits), on a
    real uvicorn server; yields the official client."""
    server = uvicorn.Server(uvicorn.Config(build_app(OpenAIServer(engine, tokenizer, "m")), host="127.0.0.1",
                                           port=free_port(), log_level="warning"))
    stopping = threading.Event()
    threads = [threading.Thread(target=engine.serve_forever, args=(stopping,)), threading.Thread(target=server.run)]
    for thread in threads:
        thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{server.config.port}/v1", api_key="none", max_retries=0)
    finally:
        server.should_exit = True
        stopping.set()
        engine.wake()
        for thread in threads:
            thread.join()


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "查询某个城市的天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名"}},
                   "required": ["city"]}}}]
CALLS = {"chatglm3": "get_weather\n```python\ntool_call(city='北京')\n```", "glm4": 'get_weather\n{"city": "北京"}'}


@pytest.mark.slow
def test_tool_calls_round_trip_through_the_openai_client(family_ckpt):
    """The model (its logits forced) answers with a call in its own format; the client gets tool_calls, plain and
    streamed, sends the result back as a tool message, and gets the answer that follows the observation."""
    family, path = family_ckpt
    tokenizer, model = load_tokenizer(path), fp32(path)
    observation, user = tokenizer.get_command("<|observation|>"), tokenizer.get_command("<|user|>")
    said = {"text": CALLS[family]}

    def answer_for(prompt: list[int]) -> list[int]:
        if observation in prompt:  # the tool's result came back: answer in words
            return tokenizer.encode("\n北京今天晴。", add_special_tokens=False) + [user]
        return tokenizer.encode(said["text"], add_special_tokens=False) + [observation]

    prompts = force_answers(model, answer_for)
    question = [{"role": "user", "content": "北京天气怎么样？"}]
    with openai_server_thread(Engine(model, 2, tokenizer), tokenizer) as client:
        first = client.chat.completions.create(model="m", messages=question, tools=WEATHER)
        assert prompts[-1] == tokenizer.build_chat_input(chat_messages(family, question, WEATHER))
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "北京"}

        chunks = list(client.chat.completions.create(model="m", messages=question, tools=WEATHER, stream=True))
        deltas = [chunk.choices[0].delta for chunk in chunks]
        assert not "".join(delta.content or "" for delta in deltas)  # the call is never shown as text
        [streamed] = [tool_call for delta in deltas for tool_call in delta.tool_calls or []]
        assert (streamed.function.name, streamed.function.arguments) == (call.function.name, call.function.arguments)
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        result = {"role": "tool", "tool_call_id": call.id, "content": "晴，23°C"}
        second = client.chat.completions.create(model="m", tools=WEATHER,
                                                messages=question + [choice.message.model_dump(exclude_none=True), result])
        assert (second.choices[0].message.content, second.choices[0].finish_reason) == ("北京今天晴。", "stop")
        assert observation in prompts[-1] and second.usage.prompt_tokens_details.cached_tokens > 0

        unused = client.chat.completions.create(model="m", messages=question, tools=WEATHER, tool_choice="none")
        assert unused.choices[0].message.content == CALLS[family] and not unused.choices[0].message.tool_calls
        assert b"get_weather" not in tokenizer.decode(prompts[-1]).encode()  # tool_choice none: no tools shown

        said["text"] = "get_weather\n{\"city\": 北京"  # malformed: plain content, not an error
        for stream in (False, True):
            answer = client.chat.completions.create(model="m", messages=question, tools=WEATHER, stream=stream)
            text = "".join(c.choices[0].delta.content or "" for c in answer) if stream else \
                answer.choices[0].message.content
            assert text == said["text"]


def test_chatglm2_refuses_tools_in_one_line(tiny_ckpt):
    request = ChatRequest(messages=[{"role": "user", "content": "hi"}], tools=WEATHER)
    with pytest.raises(ApiError, match="ChatGLM2-6B has no tool calling"):
        chat_prompt(load_tokenizer(tiny_ckpt), request)


@pytest.mark.slow
def test_openai_api_and_web_demo_serve_each_model(family_ckpt, tmp_path):
    """The real commands on each model's files: the API's model id and chat format, the page's system prompt box."""
    family, path = family_ckpt
    (title, model_id), tokenizer = MODEL_NAMES[family], load_tokenizer(path)
    port = free_port()
    process = start_server(["openai_api.py", "--model_path", str(path), "--server_port", str(port), "--dtype",
                            "fp32"], port, tmp_path / "api.log", path="/health")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list()] == [model_id]
        messages = [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "你好"}]
        answer = client.chat.completions.create(model=model_id, messages=messages, max_tokens=8, temperature=0)
        assert answer.usage.prompt_tokens == len(tokenizer.build_chat_input(messages))
        streamed = client.chat.completions.create(model=model_id, messages=messages, max_tokens=8,
                                                  temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == answer.choices[0].message.content
    finally:
        assert stop(process) == 0
    port = free_port()
    process = start_server(["web_demo.py", "--model_path", str(path), "--server_port", str(port)], port,
                           tmp_path / "web.log", MAX_SEQ_LEN="512", GRADIO_ANALYTICS_ENABLED="False")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                tmp_path / "profile", executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            expect(page).to_have_title(re.compile(rf"{title} .* on CPU"))
            page.get_by_label("System prompt").fill("你是一个助手。")
            page.get_by_label("number input for Maximum length").fill("64")
            page.get_by_placeholder("Input...").fill("你好")
            page.get_by_role("button", name="Submit").click()
            expect(page.locator("[data-testid=bot]")).to_have_count(1, timeout=30_000)
            expect(page.locator("[data-testid=user]")).to_have_text("你好")
            browser.close()
    finally:
        assert stop(process) == 0
