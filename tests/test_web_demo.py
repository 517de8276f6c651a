"""web_demo.py end to end: the real server on a random checkpoint, driven by headless Chromium, gradio_client and
torchrun."""
import re
import socket
import time

import pytest
from gradio_client import Client
from playwright.sync_api import expect, sync_playwright

from chatglm2.tensor_parallel import write_tp_parts
from helpers import free_port, kill_all, rank0_pid, run, start_server, stop, torchrun_args

CHROMIUM = "/usr/bin/chromium"
# Playwright adds --headless and a fresh --user-data-dir (the profile folder below) itself.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Random weights never say EOS, so every answer runs to max_length; a small MAX_SEQ_LEN keeps "too long" cheap.
SERVER_ENV = dict(MAX_SEQ_LEN="512", GRADIO_ANALYTICS_ENABLED="False")
# Records every distinct text of the newest answer bubble as [its number, text], to see answers grow token by token.
WATCH_ANSWERS = """() => {
    window.answerTexts = [];
    let last = '';
    new MutationObserver(() => {
        const answers = document.querySelectorAll('[data-testid=bot]');
        const text = answers.length ? answers[answers.length - 1].innerText : '';
        if (text && text !== last) window.answerTexts.push([answers.length, text]);
        last = text;
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""

pytestmark = pytest.mark.slow  # every test here starts the commands as processes


def answer(chatbot: list[dict]) -> str:
    """The text of the last message as gradio_client returns it."""
    content = chatbot[-1]["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def ask(client: Client, query: str, max_length: int = 64) -> list[dict]:
    return client.predict(query, [], max_length, 0.8, 0.95, api_name="/chat")


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory) -> str:
    port = free_port()
    log = tmp_path_factory.mktemp("web") / "server.log"
    process = start_server(["web_demo.py", "--model_path", str(tiny_ckpt), "--server_port", str(port)], port, log,
                           **SERVER_ENV)
    yield f"http://127.0.0.1:{port}/"
    assert stop(process) == 0, log.read_text()[-3000:]


def test_page_streams_two_turns_and_clears(server, tmp_path):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            tmp_path / "profile", executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 1000})
        page = browser.new_page()
        try:
            page.goto(server)
            expect(page).to_have_title(re.compile(r"ChatGLM2-6B .* on CPU"))
            page.evaluate(WATCH_ANSWERS)
            answers = page.locator("[data-testid=bot]")
            chat_status = page.locator(".block:has([role=log]) [data-testid=status-tracker]")
            # The second prompt holds the first answer, so it needs a larger max_length than the first.
            for turn, (query, max_length) in enumerate([("你好", 48), ("Write a short poem about the sea.", 200)], 1):
                page.get_by_label("number input for Maximum length").fill(str(max_length))
                page.get_by_placeholder("Input...").fill(query)
                page.get_by_role("button", name="Submit").click()
                expect(answers).to_have_count(turn, timeout=30_000)
                expect(chat_status).to_have_class(re.compile(r"\bhide\b"), timeout=30_000)  # the answer is complete
                texts = [text for number, text in page.evaluate("window.answerTexts") if number == turn]
                assert len(texts) >= 2 and texts[-1].startswith(texts[0]), f"turn {turn} did not stream: {texts[:3]}"
                expect(page.locator("[data-testid=user]").nth(turn - 1)).to_have_text(query)
                expect(page.get_by_placeholder("Input...")).to_have_value("")
            page.get_by_role("button", name="Clear History").click()
            expect(page.locator("[data-testid=user], [data-testid=bot]")).to_have_count(0)
        except BaseException:
            page.screenshot(path=tmp_path / "web_demo_failure.png", full_page=True)
            print(f"screenshot of the failure: {tmp_path / 'web_demo_failure.png'}")
            raise
        finally:
            browser.close()


def test_two_users_are_answered_at_once_each_their_own_answer(server):
    first, second = Client(server, verbose=False), Client(server, verbose=False)
    jobs = [first.submit("你好", [], 400, 0.8, 0.95, api_name="/chat"),
            second.submit("1+1=?", [], 400, 0.8, 0.95, api_name="/chat")]
    deadline = time.monotonic() + 60
    while not all(len(job.outputs()) >= 2 for job in jobs) and time.monotonic() < deadline:
        assert not any(job.done() for job in jobs), "one user waited for the other's whole answer"
        time.sleep(0.02)
    results = [job.result(timeout=60) for job in jobs]
    for query, chatbot, job in zip(["你好", "1+1=?"], results, jobs):
        assert [message["role"] for message in chatbot] == ["user", "assistant"]
        assert answer(chatbot[:1]) == query and answer(chatbot)
        assert len(job.outputs()) > 2  # streamed, not one final message


def test_bad_messages_are_answered_and_the_server_keeps_serving(server):
    client = Client(server, verbose=False)
    assert ask(client, "   ") == []  # ignored: nothing added to the chat
    too_long = ask(client, "the sea " * 400)
    assert answer(too_long).startswith("**Error:**") and "MAX_SEQ_LEN" in answer(too_long)
    assert answer(ask(client, "你好"))


def test_port_in_use_is_one_line_and_exit_2(tiny_ckpt):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("web_demo.py", "--model_path", str(tiny_ckpt), "--server_port", str(port), timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: cannot listen on 127.0.0.1:{port} (Address already in use); "
                                          f"pick a free port with --server_port"]


def test_torchrun_two_ranks_answer_cancel_and_stop_with_rank0(tiny_ckpt, tmp_path):
    model_path = tmp_path / "tp2"  # the split checkpoint, usable as --model_path
    write_tp_parts(tiny_ckpt, 2, model_path, show_progress=False)
    port = free_port()
    torchrun = start_server([*torchrun_args(2), "web_demo.py", "--model_path", str(model_path), "--tp_size", "2",
                             "--server_port", str(port)], port, tmp_path / "log", **SERVER_ENV)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        assert answer(ask(client, "你好"))
        # Leave mid-answer, as a closed browser does: both ranks must stop together and serve the next one.
        long_job = client.submit("Write a long story.", [], 512, 0.8, 0.95, api_name="/chat")
        while len(long_job.outputs()) < 3 and not long_job.done():
            time.sleep(0.05)
        long_job.cancel()
        assert answer(ask(client, "1+1=?"))
        # Stopping rank 0 alone ends everything cleanly: rank 1 leaves on rank 0's stop message.
        assert stop(torchrun, pid=rank0_pid(torchrun)) == 0, (tmp_path / "log").read_text()[-3000:]
    finally:
        if torchrun.poll() is None:
            kill_all(torchrun)
