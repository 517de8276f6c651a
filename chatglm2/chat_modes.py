"""main.py's two interactive-sized modes: precision_single (the fixed question) and cli_demo (a streaming chat)."""
import sys
import time
import unicodedata

import torch

from chatglm2 import collectives
from chatglm2.errors import InputError
from chatglm2.generation import chat_input
from chatglm2.tokenizer import MODEL_NAMES

SINGLE_QUESTION = "下列选项中，属于我国古代四大发明的是____。\nA. 丝绸\nB. 瓷器\nC. 火药\nD. 茶叶"
SINGLE_MAX_NEW_TOKENS = 512
WELCOME = "欢迎使用 {model} 模型，输入内容即可进行对话，clear 清空对话历史，stop 终止程序"
NOT_UTF8 = "[the input is not UTF-8 text (is the terminal set to another encoding?); it was ignored]"


def printable(text: str) -> str:
    """Control characters other than newline and tab escaped (\\x1b), so that a model's answer cannot move the
    cursor, clear the screen or retitle the terminal."""
    return "".join(c.encode("unicode_escape").decode() if unicodedata.category(c) == "Cc" and c not in "\n\t" else c
                   for c in text)


def single_prompt(tokenizer) -> list[int]:
    return chat_input(tokenizer, SINGLE_QUESTION, [])


def single_max_new_tokens(prompt_ids: list[int], max_seq_len: int) -> int:
    """The answer's budget: 512 tokens, or what MAX_SEQ_LEN leaves after the prompt; InputError when nothing is left.
    It needs the tokenizer only, so main.py asks before the model loads."""
    max_new_tokens = min(SINGLE_MAX_NEW_TOKENS, max_seq_len - len(prompt_ids))
    if max_new_tokens < 1:
        raise InputError(f"MAX_SEQ_LEN={max_seq_len} leaves no room to answer; export MAX_SEQ_LEN=1024")
    return max_new_tokens


def precision_single(model, tokenizer, batch: int) -> None:
    """The fixed question, `batch` copies, answered greedily."""
    prompt_ids = single_prompt(tokenizer)
    max_new_tokens = single_max_new_tokens(prompt_ids, model.max_seq_len)
    input_ids = torch.tensor([prompt_ids]).expand(batch, -1)  # tokenized once: every row is the same
    start = time.perf_counter()
    output_ids = model.generate(input_ids, max_new_tokens=max_new_tokens, stop_token_ids=tokenizer.chat_stop_ids)
    elapsed = time.perf_counter() - start
    if collectives.is_rank0():
        print(f"问：{SINGLE_QUESTION}")
        for row, ids in enumerate(output_ids):
            print(f"[batch {row}] 答：{printable(tokenizer.decode(ids).strip())}")
        print(f"{output_ids.numel()} tokens in {elapsed:.2f} s", flush=True)


def read_user_turn() -> str:
    """Rank 0 reads stdin; every rank gets the same text (end of input means stop, text that is not UTF-8 an empty
    turn)."""
    text = None
    if collectives.is_rank0():
        try:
            text = input("\n用户：")
        except EOFError:
            text = "stop"
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8, kept as surrogates (see cli_demo)
            print(NOT_UTF8, flush=True)
            text = ""
    return collectives.broadcast_object(text)


def cli_demo(model, tokenizer) -> None:
    """Streaming chat with history; `clear` forgets the history, `stop` (or end of input) quits."""
    rank0 = collectives.is_rank0()
    history = []
    welcome = WELCOME.format(model=MODEL_NAMES[tokenizer.chat_family][0])
    if rank0:
        sys.stdin.reconfigure(errors="surrogateescape")  # a line that is not UTF-8 must not end the session
        print(welcome, flush=True)
    while True:
        query = read_user_turn().strip()
        if query == "stop":
            return
        if query == "clear":
            history = []
            if rank0:
                print("\n" + welcome, flush=True)  # piped input is not echoed: leave the prompt's line first
            continue
        if not query:
            continue
        printed = ""
        if rank0:
            print("\nChatGLM：", end="", flush=True)
        try:
            for response, history in model.stream_chat(tokenizer, query, history):
                if rank0:
                    print(printable(response[len(printed):] if response.startswith(printed) else "\n" + response), end="",
                          flush=True)
                printed = response
        except InputError as error:  # e.g. the history outgrew MAX_SEQ_LEN: say so and keep the session
            if rank0:
                print(f"[{error}]", end="", flush=True)
        if rank0:
            print(flush=True)
