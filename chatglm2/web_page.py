"""The Gradio chat page of web_demo.py and the model loop behind it.

Rank 0 serves the page. Under tensor parallel every rank must run the same model steps, so all model calls happen
in one loop (model_loop) on every rank: rank 0 feeds it the page's requests and broadcasts each one, then a
continue/stop flag before every step, so a closed browser or a Clear History stops the answer on all ranks at once.
"""
import argparse
import html
import queue
import signal
import socket
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import gradio as gr

from chatglm2 import collectives
from chatglm2.errors import InputError

Messages = list[dict]
History = list[tuple[str, str]]
DONE = object()  # end of one answer in Request.replies


@dataclass
class Request:
    """One question from the page; `params` go to every rank, the rest stays on rank 0."""
    params: dict
    replies: queue.Queue = field(default_factory=queue.Queue)  # answers so far, then DONE or an exception
    cancelled: threading.Event = field(default_factory=threading.Event)


def check_port_free(host: str, port: int) -> None:
    """Fail before the model loads (minutes for the real one) rather than after."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: a port in TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError as error:
            raise InputError(f"cannot listen on {host}:{port} ({error.strerror}); "
                             f"pick a free port with --server_port") from None


def ignore_stop_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def model_loop(model, tokenizer, requests: "queue.Queue[Request | None] | None" = None,
               stopping: threading.Event | None = None) -> None:
    """Answer requests one at a time until rank 0 sends None; every rank runs this, only rank 0 has `requests`.

    `stopping` (rank 0) cuts short the answer in progress when the server shuts down.
    """
    rank0 = collectives.is_rank0()
    while True:
        request = requests.get() if rank0 else None
        params = collectives.broadcast_object(request.params if request else None)
        if params is None:
            return
        try:
            for response, _ in model.stream_chat(tokenizer, **params):
                # Rank 0 decides for all ranks whether the next step runs, so they never fall out of step.
                go_on = rank0 and not (request.cancelled.is_set() or stopping.is_set())
                if not collectives.broadcast_object(go_on):
                    break
                if rank0:
                    request.replies.put(response)
            if rank0:
                request.replies.put(DONE)
        except Exception as error:  # a bad request (InputError) or a model failure: tell its user, keep serving
            if not isinstance(error, InputError):
                traceback.print_exc()  # not the user's fault: keep the trace for whoever runs the server
            if rank0:
                request.replies.put(error)


def build_page(model, tokenizer, args: argparse.Namespace, requests: "queue.Queue[Request | None]") -> gr.Blocks:
    title = (f"ChatGLM2-6B ({Path(args.model_path).resolve().name}) on {model.device.type.upper()}, "
             f"{str(model.dtype).removeprefix('torch.')}, tp_size {args.tp_size}")

    def predict(query: str, chatbot: Messages, max_length: float, top_p: float, temperature: float,
                history: History) -> Iterator[tuple[Messages, History]]:
        if not query.strip():
            gr.Info("Type a message first.")
            yield chatbot, history
            return
        request = Request(dict(query=query, history=history, max_length=int(max_length), top_p=top_p,
                               temperature=temperature))
        requests.put(request)
        chatbot = chatbot + [{"role": "user", "content": query}, {"role": "assistant", "content": ""}]
        try:
            while (reply := request.replies.get()) is not DONE:
                if isinstance(reply, Exception):
                    chatbot[-1] = {"role": "assistant", "content": f"**Error:** {reply}"}
                    yield chatbot, history
                    return
                chatbot[-1] = {"role": "assistant", "content": reply}
                yield chatbot, history + [(query, reply)]
        finally:  # also reached when Gradio closes this generator: the browser left or Clear History was pressed
            request.cancelled.set()

    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.HTML(f"<h1 align='center'>{html.escape(title)}</h1>")
        chatbot = gr.Chatbot(label="Chat", height=480, buttons=["copy", "copy_all"])
        with gr.Row():
            with gr.Column(scale=4):
                user_input = gr.Textbox(show_label=False, placeholder="Input...", lines=10)
                submit = gr.Button("Submit", variant="primary")
            with gr.Column(scale=1):
                clear = gr.Button("Clear History")
                max_length = gr.Slider(0, 32768, value=8192, step=1, label="Maximum length")
                top_p = gr.Slider(0, 1, value=0.8, step=0.01, label="Top P")
                temperature = gr.Slider(0, 1, value=0.95, step=0.01, label="Temperature")
        history = gr.State([])

        answering = submit.click(predict, [user_input, chatbot, max_length, top_p, temperature, history],
                                 [chatbot, history], api_name="chat", concurrency_limit=1)
        submit.click(lambda: "", None, user_input, queue=False, api_visibility="private")
        clear.click(lambda: ([], []), None, [chatbot, history], cancels=[answering], queue=False,
                    api_visibility="private")
        # The chat's own trash icon empties the chat; forget the history with it, as Clear History does.
        chatbot.clear(lambda: [], None, history, cancels=[answering], queue=False, api_visibility="private")
    return page
