"""An OpenAI-compatible HTTP API (openai_api.py) over the continuous-batching engine.

GET /health, GET /metrics (Prometheus), GET /v1/models, POST /v1/chat/completions, POST /v1/completions; streaming
as server-sent events in OpenAI's chunk shape ending with `data: [DONE]`; errors in OpenAI's shape. Chat prompts are
built in the model's own format; ChatGLM3 and GLM-4 take `tools` and answer with `tool_calls` (tool_calls.py). Each
choice is an engine request; the engine thread tells the event loop about new tokens, so any number of clients wait
without a thread each. A client that disconnects cancels its requests.
"""
import asyncio
import json
import queue
import time
import uuid
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from chatglm2.engine import Engine, EngineFull, SamplingParams
from chatglm2.errors import InputError
from chatglm2.generation import chat_history
from chatglm2.metrics import metrics_registry
from chatglm2.tool_calls import ToolCall, chat_messages, may_become_tool_call, parse_tool_call

RETRY_AFTER_S = 1
MAX_STOP_STRINGS = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


class StreamOptions(BaseModel):
    include_usage: bool = False


class Settings(BaseModel):
    """The sampling fields both endpoints take; defaults are ChatGLM2's chat defaults (THUDM's stream_chat)."""
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    temperature: float = Field(0.8, ge=0, le=2)
    top_p: float = Field(0.8, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # not OpenAI's, as vLLM's servers accept it: 0 = off
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None


class Function(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: Function


class CalledFunction(BaseModel):
    name: str
    arguments: str


class ToolCallMessage(BaseModel):
    id: str = ""
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    tool_calls: list[ToolCallMessage] | None = None
    tool_call_id: str | None = None


class ChatRequest(Settings):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none"] | dict | None = None


class CompletionRequest(Settings):
    prompt: str


def error_response(error: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 503 else None
    body = {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": None}}
    return JSONResponse(body, status_code=error.status, headers=headers)


def chat_prompt(tokenizer, body: ChatRequest) -> tuple[list[int], set[str]]:
    """The prompt in the model's format, and the names of the tools the answer may call (none when tool_choice is
    "none": then the tools are not shown to the model either)."""
    if isinstance(body.tool_choice, dict):
        raise ApiError(400, "tool_choice takes \"auto\" or \"none\"; naming a function is not supported",
                       param="tool_choice")
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []] if body.tool_choice != "none" else []
    if tokenizer.chat_family == "chatglm2":
        if tools or any(m.role == "tool" or m.tool_calls for m in body.messages):
            raise ApiError(400, "ChatGLM2-6B has no tool calling; serve ChatGLM3-6B or GLM-4-9B-chat for tools",
                           param="tools")
        return chatglm2_prompt(tokenizer, body.messages), set()
    if body.messages[-1].role not in ("user", "tool"):
        raise ApiError(400, "the last message must be the user's or a tool's result", param="messages")
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    try:
        prompt_ids = tokenizer.build_chat_input(chat_messages(tokenizer.chat_family, messages, tools or None))
    except (ValueError, InputError) as error:
        raise ApiError(400, str(error), param="messages") from None
    return prompt_ids, {tool["function"]["name"] for tool in tools}


def chatglm2_prompt(tokenizer, messages: list[Message]) -> list[int]:
    """ChatGLM2's `[Round N]` prompt: optional system message, then user/assistant pairs, ending with a user turn."""
    if any(m.content is None for m in messages):
        raise ApiError(400, "every message needs content", param="messages")
    system = messages[0].content if messages[0].role == "system" else None
    turns = messages[1:] if system is not None else messages
    if not turns or turns[-1].role != "user":
        raise ApiError(400, "the last message must be the user's", param="messages")
    for i, message in enumerate(turns):
        if message.role != ("user" if i % 2 == 0 else "assistant"):
            raise ApiError(400, f"message {i}: after an optional system message, roles must alternate user, "
                                f"assistant, ..., user", param="messages")
    pairs = [(turns[i].content, turns[i + 1].content) for i in range(0, len(turns) - 1, 2)]
    query, history = chat_history(system, pairs, turns[-1].content)
    return tokenizer.encode(tokenizer.build_prompt(query, history))


def tool_call_message(call: ToolCall) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


class OpenAIServer:
    def __init__(self, engine: Engine, tokenizer, model_name: str, api_key: str | None = None):
        self.engine, self.tokenizer, self.model_name, self.api_key = engine, tokenizer, model_name, api_key
        self.created = int(time.time())
        self.stop_ids = set(engine.model.config.eos_token_ids) | set(tokenizer.chat_stop_ids)

    def params(self, body: Settings, prompt_len: int, chat: bool) -> list[SamplingParams]:
        if body.n > self.engine.max_batch:
            raise ApiError(400, f"n must be at most {self.engine.max_batch} (the server's --max_batch)", param="n")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP_STRINGS or not all(stop):
            raise ApiError(400, f"stop takes up to {MAX_STOP_STRINGS} non-empty strings", param="stop")
        room = self.engine.model.max_seq_len - prompt_len
        if room < 1:
            raise ApiError(400, f"the prompt is {prompt_len} tokens, which leaves no room under the server's "
                                f"MAX_SEQ_LEN={self.engine.model.max_seq_len}; shorten it", param="messages")
        max_tokens = body.max_tokens or room
        return [SamplingParams(max_new_tokens=max_tokens, do_sample=body.temperature > 0, temperature=body.temperature,
                               top_p=body.top_p, top_k=body.top_k, seed=None if body.seed is None else body.seed + i,
                               stop=tuple(stop), stop_token_ids=self.tokenizer.chat_stop_ids if chat else ())
                for i in range(body.n)]

    def submit(self, prompt_ids: list[int], params: list[SamplingParams], wake: asyncio.Event) -> list:
        loop = asyncio.get_running_loop()
        requests = []
        try:
            for p in params:
                requests.append(self.engine.submit(prompt_ids, p, lambda: loop.call_soon_threadsafe(wake.set)))
        except (EngineFull, InputError) as error:
            for request in requests:  # the choices already queued
                request.cancel()
            if isinstance(error, EngineFull):
                raise ApiError(503, "the server is busy: its waiting queue is full; retry shortly", "server_error")
            raise ApiError(400, str(error)) from None
        return requests

    async def updates(self, requests: list, wake: asyncio.Event, http: Request) -> AsyncIterator[int]:
        """Yield the index of a choice each time its request has news, until all have finished; a client that
        went away cancels them."""
        done = [False] * len(requests)
        try:
            while not all(done):
                wake.clear()
                for i, request in enumerate(requests):
                    news = False
                    while not done[i]:
                        try:
                            done[i] = request.updates.get_nowait() is None
                            news = True
                        except queue.Empty:
                            break
                    if news:
                        yield i
                if not all(done):
                    try:
                        await asyncio.wait_for(wake.wait(), timeout=1.0)
                    except asyncio.TimeoutError:
                        if await http.is_disconnected():
                            return
        finally:
            for request in requests:
                request.cancel()

    def choice_text(self, request, chat: bool) -> tuple[str, str | None]:
        """The text so far (up to a stop string, and holding back what may be the start of one), and the finish
        reason once finished. A chat answer starts at its first visible character, as THUDM's chat does."""
        text = self.tokenizer.decode(request.tokens)
        text = text.lstrip() if chat else text
        stops = request.params.stop
        cut = min([text.find(s) for s in stops if s in text], default=-1)
        if cut >= 0:
            return text[:cut], request.finish_reason and "stop"
        if request.finish_reason is None:
            if text.endswith("\ufffd"):  # the rest of a split multi-byte character is still to come
                text = text.rstrip("\ufffd")
            hold = max((len(s) - 1 for s in stops), default=0)
            return text[:len(text) - hold] if hold else text, None
        return text, "length" if request.finish_reason == "length" else "stop"

    def chat_choice(self, request, tool_names: set[str]) -> tuple[str, str | None, ToolCall | None]:
        """choice_text for a chat answer, which may be a tool call: held back while it may become one, parsed once
        finished (a malformed call stays plain content)."""
        text, reason = self.choice_text(request, chat=True)
        if not tool_names:
            return text, reason, None
        if reason is None:
            return ("" if may_become_tool_call(text, tool_names) else text), None, None
        call = parse_tool_call(self.tokenizer.chat_family, text, tool_names)
        return (text, reason, None) if call is None else ("", "tool_calls", call)

    def usage(self, prompt_ids: list[int], requests: list) -> dict:
        completion = sum(len([t for t in r.tokens if t not in self.stop_ids]) for r in requests)
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
                "total_tokens": len(prompt_ids) + completion,
                "prompt_tokens_details": {"cached_tokens": max(r.cached_tokens for r in requests)}}

    async def respond(self, http: Request, body: Settings, prompt_ids: list[int], chat: bool,
                      tool_names: set[str] = frozenset()):
        params = self.params(body, len(prompt_ids), chat)
        wake = asyncio.Event()
        requests = self.submit(prompt_ids, params, wake)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": ident, "created": int(time.time()), "model": self.model_name}
        if body.stream:
            stream = self.stream(http, head, body, prompt_ids, requests, wake, chat, tool_names)
            return StreamingResponse(stream, media_type="text/event-stream")
        async for _ in self.updates(requests, wake, http):
            pass
        choices = []
        for i, request in enumerate(requests):
            if chat:
                text, reason, call = self.chat_choice(request, tool_names)
                message = {"role": "assistant", "content": text} if call is None else \
                    {"role": "assistant", "content": None, "tool_calls": [tool_call_message(call)]}
                choice = {"message": message}
            else:
                text, reason = self.choice_text(request, chat)
                choice = {"text": text, "logprobs": None}
            choices.append({"index": i, **choice, "finish_reason": reason})
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": self.usage(prompt_ids, requests)}

    async def stream(self, http: Request, head: dict, body: Settings, prompt_ids: list[int], requests: list,
                     wake: asyncio.Event, chat: bool, tool_names: set[str]) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict], **extra) -> str:
            return f"data: {json.dumps({**head, 'object': kind, 'choices': choices, **extra}, ensure_ascii=False)}\n\n"

        sent = [""] * len(requests)
        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant"}, "finish_reason": None}
                         for i in range(len(requests))])
        async for i in self.updates(requests, wake, http):
            if chat:
                text, reason, call = self.chat_choice(requests[i], tool_names)
                if call is not None:
                    yield chunk([{"index": i, "delta": {"tool_calls": [{"index": 0, **tool_call_message(call)}]},
                                  "finish_reason": reason}])
                    continue
            else:
                text, reason = self.choice_text(requests[i], chat)
            delta, sent[i] = text[len(sent[i]):], text
            if delta or reason:
                piece = {"delta": {"content": delta} if delta else {}} if chat else {"text": delta, "logprobs": None}
                yield chunk([{"index": i, **piece, "finish_reason": reason}])
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], usage=self.usage(prompt_ids, requests))
        yield "data: [DONE]\n\n"


def build_app(server: OpenAIServer) -> FastAPI:
    app = FastAPI(title=f"{server.model_name} OpenAI-compatible API", docs_url=None, redoc_url=None)
    registry = metrics_registry(server.engine)

    @app.middleware("http")
    async def check_key(http: Request, call_next):
        if server.api_key and http.url.path not in ("/health", "/metrics") and \
                http.headers.get("authorization", "") != f"Bearer {server.api_key}":
            return error_response(ApiError(401, "a valid API key is needed: send Authorization: Bearer KEY",
                                           "authentication_error"))
        return await call_next(http)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        message = "the body is not valid JSON" if first["type"] == "json_invalid" else f"{where}: {first['msg']}"
        return error_response(ApiError(400, message, param=where or None))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **server.engine.stats()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "chatglm2"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request, body: ChatRequest):
        prompt_ids, tool_names = chat_prompt(server.tokenizer, body)
        return await server.respond(http, body, prompt_ids, chat=True, tool_names=tool_names)

    @app.post("/v1/completions")
    async def completions(http: Request, body: CompletionRequest):
        if not body.prompt:
            raise ApiError(400, "prompt is empty", param="prompt")
        return await server.respond(http, body, server.tokenizer.encode(body.prompt), chat=False)

    return app
