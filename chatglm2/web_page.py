"""The Gradio chat page of web_demo.py, on the continuous-batching engine.

Rank 0 serves the page and runs the engine; every question is an engine request, so several users are answered at
once (up to the engine's max_batch; Gradio's concurrency is raised to match). A closed browser, Clear History or
the chat's trash icon cancels the request, which frees its KV blocks at the next iteration.
"""
import html
from typing import Iterator

import gradio as gr

from chatglm2.engine import Engine, EngineFull, SamplingParams
from chatglm2.errors import InputError
from chatglm2.generation import answer_budget, chat_input, history_with, response_texts

Messages = list[dict]
History = list  # (query, response) pairs for ChatGLM2, role messages for ChatGLM3 and GLM-4


def build_page(engine: Engine, tokenizer, title: str) -> gr.Blocks:
    """The chat page; a model with a system role (ChatGLM3, GLM-4) gets a system prompt box."""
    model = engine.model
    has_system_role = tokenizer.chat_family != "chatglm2"

    def predict(query: str, chatbot: Messages, max_length: float, top_p: float, temperature: float,
                history: History, system: str | None = None) -> Iterator[tuple[Messages, History]]:
        if not query.strip():
            gr.Info("Type a message first.")
            yield chatbot, history
            return
        chatbot = chatbot + [{"role": "user", "content": query}, {"role": "assistant", "content": ""}]
        try:
            prompt_ids = chat_input(tokenizer, query, history, (system or "").strip() or None)
            budget = answer_budget(len(prompt_ids), int(max_length), model.max_seq_len)
            request = engine.submit(prompt_ids, SamplingParams(max_new_tokens=budget, do_sample=True, top_p=top_p,
                                                               temperature=temperature,
                                                               stop_token_ids=tokenizer.chat_stop_ids))
        except (InputError, EngineFull) as error:
            chatbot[-1] = {"role": "assistant", "content": f"**Error:** {error}"}
            yield chatbot, history
            return
        try:
            for reply in response_texts(tokenizer, request.stream(), tokenizer.chat_stop_ids):
                chatbot[-1] = {"role": "assistant", "content": reply}
                yield chatbot, history_with(tokenizer, history, query, reply)
            if request.finish_reason == "error":
                chatbot[-1] = {"role": "assistant", "content": "**Error:** the model failed; see the server's log"}
                yield chatbot, history
        finally:  # also reached when Gradio closes this generator: the browser left or Clear History was pressed
            request.cancel()

    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.HTML(f"<h1 align='center'>{html.escape(title)}</h1>")
        chatbot = gr.Chatbot(label="Chat", height=480, buttons=["copy", "copy_all"])
        with gr.Row():
            with gr.Column(scale=4):
                user_input = gr.Textbox(show_label=False, placeholder="Input...", lines=10)
                submit = gr.Button("Submit", variant="primary")
            with gr.Column(scale=1):
                system = gr.Textbox("", label="System prompt", lines=3, visible=has_system_role)
                clear = gr.Button("Clear History")
                max_length = gr.Slider(0, 32768, value=8192, step=1, label="Maximum length")
                top_p = gr.Slider(0, 1, value=0.8, step=0.01, label="Top P")
                temperature = gr.Slider(0, 1, value=0.95, step=0.01, label="Temperature")
        history = gr.State([])

        answering = submit.click(predict, [user_input, chatbot, max_length, top_p, temperature, history, system],
                                 [chatbot, history], api_name="chat", concurrency_limit=engine.max_batch)
        submit.click(lambda: "", None, user_input, queue=False, api_visibility="private")
        clear.click(lambda: ([], []), None, [chatbot, history], cancels=[answering], queue=False,
                    api_visibility="private")
        # The chat's own trash icon empties the chat; forget the history with it, as Clear History does.
        chatbot.clear(lambda: [], None, history, cancels=[answering], queue=False, api_visibility="private")
    return page
