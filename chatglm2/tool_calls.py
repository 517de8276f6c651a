"""OpenAI `tools` <-> ChatGLM3 / GLM-4 tool calls, as THUDM's own OpenAI servers do it (ChatGLM3's
openai_api_demo, GLM-4's basic_demo/openai_api_server.py): requests become the model's message list, answers
become a ToolCall or stay text."""
import ast
import json
import keyword
from dataclasses import dataclass

FAMILIES = ("chatglm3", "glm4")
# ChatGLM3's openai_api_demo/utils.py process_chatglm_messages
CHATGLM3_TOOLS_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"
# What ast.parse, ast.literal_eval and json raise on bad or hostile text (MemoryError: nesting too deep to parse).
PARSE_ERRORS = (SyntaxError, ValueError, TypeError, RecursionError, MemoryError)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, json.dumps(..., ensure_ascii=False)


def _one_line_name(name: object) -> bool:
    # the name travels as the metadata after <|assistant|>, one line that the parsers strip
    return isinstance(name, str) and name != "" and name == name.strip() and "\n" not in name


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _json_object(text: str) -> dict | None:
    """A JSON object without NaN or Infinity (they have no JSON spelling to hand back), else None."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _chatglm3_call_body(name: str, arguments: dict) -> str:
    """The fenced `tool_call(...)` that ChatGLM3 answers with, built as THUDM's fine-tuning data builds it
    (finetune_chatmodel_demo/preprocess_utils.py format_function_call: unparse of keyword constants)."""
    for key in arguments:
        if not key.isidentifier() or keyword.iskeyword(key):
            raise ValueError(f"tool call {name!r}: argument {key!r} is no Python identifier, ChatGLM3 cannot pass it")
    call = ast.Call(func=ast.Name(id="tool_call"), args=[],
                    keywords=[ast.keyword(arg=key, value=ast.Constant(value)) for key, value in arguments.items()])
    return f"```python\n{ast.unparse(call)}\n```"


def _check_tools(tools: list[dict]) -> None:
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function" or not _one_line_name(function.get("name")):
            raise ValueError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}} with a one-line name")


def chat_messages(family: str, messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """OpenAI chat messages (and tools) as the model's messages (role system/user/assistant/observation, content,
    metadata; the tools ride on a system message), as THUDM's server for `family` builds them. ValueError, one line,
    for what cannot be rendered."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    out = []
    drop_system = bool(tools)
    if tools:
        _check_tools(tools)
        # ChatGLM3's server passes request.tools through whole; GLM-4's chat template lists each tool's "function".
        out.append({"role": "system", "content": CHATGLM3_TOOLS_PROMPT if family == "chatglm3" else None, "tools": tools})
    pending = None  # ids of the calls that tool messages may answer now
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        calls = message.get("tool_calls") if role == "assistant" else None
        if role not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"messages[{i}]: role must be system, user, assistant or tool, not {role!r}")
        if not (isinstance(content, str) or content is None and calls):
            raise ValueError(f"messages[{i}]: content must be a string (null only beside an assistant's tool_calls)")
        if role == "tool":
            if pending is None or message.get("tool_call_id") not in pending:
                raise ValueError(f"messages[{i}]: a tool message must answer (tool_call_id) a call of the assistant message before it")
            out.append({"role": "observation", "content": content})
            continue
        pending = None
        if role == "system" and drop_system:
            # both servers let their tools system message stand in for the request's first system message
            drop_system = False
        elif calls:
            if not isinstance(calls, list):
                raise ValueError(f"messages[{i}]: tool_calls must be a list")
            pending = set()
            for j, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                name = function.get("name") if isinstance(function, dict) else None
                arguments = function.get("arguments") if isinstance(function, dict) else None
                parsed = _json_object(arguments) if isinstance(arguments, str) else None
                if not _one_line_name(name) or parsed is None:
                    raise ValueError(f"messages[{i}].tool_calls[{j}]: function needs a one-line name, a JSON object as arguments")
                # text beside the calls is dropped, as GLM-4's server drops it
                body = _chatglm3_call_body(name, parsed) if family == "chatglm3" else arguments
                out.append({"role": "assistant", "metadata": name, "content": body})
                pending.add(call.get("id"))
        elif role == "assistant" and family == "glm4":
            out.append({"role": "assistant", "metadata": "", "content": content.strip()})
        else:
            out.append({"role": role, "content": content})
    return out


def _chatglm3_arguments(body: str) -> dict | None:
    """`tool_call(key=literal, ...)` read with ast alone (THUDM eval()s it): keyword arguments only, each a literal."""
    try:
        call = ast.parse(body, mode="eval").body
    except PARSE_ERRORS:
        return None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call") or call.args:
        return None
    keys = [item.arg for item in call.keywords]
    if None in keys or len(set(keys)) != len(keys):  # **mapping, or a name twice (ast.parse lets that through)
        return None
    try:
        return {item.arg: ast.literal_eval(item.value) for item in call.keywords}
    except PARSE_ERRORS:
        return None


def parse_tool_call(family: str, text: str, tool_names: set[str]) -> ToolCall | None:
    """The decoded answer as a call of one of `tool_names`, or None when it is plain text (or malformed)."""
    lines = text.strip().split("\n")
    if len(lines) < 2 or lines[0].strip() not in tool_names:
        return None
    if family == "chatglm3":
        # modeling_chatglm.py process_response: the body's first and last lines are the ``` fences
        arguments = _chatglm3_arguments("\n".join(lines[2:-1]))
    elif family == "glm4" and lines[1].startswith("{"):  # GLM-4's process_response: the arguments open a JSON object
        arguments = _json_object("\n".join(lines[1:]))
    else:
        return None
    if arguments is None:
        return None
    try:
        return ToolCall(lines[0].strip(), json.dumps(arguments, ensure_ascii=False, allow_nan=False))
    except PARSE_ERRORS:  # a set, bytes or an infinite float from literal_eval has no JSON spelling
        return None


def may_become_tool_call(text: str, tool_names: set[str]) -> bool:
    """While streaming: could the answer so far still turn out to be a call (so it must be held back)?"""
    head = text.lstrip()
    if "\n" in head:
        return head.split("\n", 1)[0].strip() in tool_names
    # the parsers strip the name line, so trailing blanks after a whole name keep it a call
    return any(name.startswith(head) for name in tool_names) or head.rstrip() in tool_names
