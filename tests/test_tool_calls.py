"""OpenAI tools <-> ChatGLM3 / GLM-4 calls (chatglm2/tool_calls.py), on THUDM's own example strings."""
import json

import pytest

from chatglm2.tool_calls import ToolCall, chat_messages, may_become_tool_call, parse_tool_call

# THUDM/ChatGLM3 openai_api_demo/openai_api_request.py, function_chat()
CHATGLM3_QUESTION = "What's the weather like in San Francisco, Tokyo, and Paris?"
CHATGLM3_TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}]
# THUDM/ChatGLM3 openai_api_demo/utils.py process_chatglm_messages
CHATGLM3_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"

# THUDM/GLM-4 basic_demo/openai_api_request.py, function_chat() (the tool_calls and tool messages are its
# commented-out "Give Observations" turn)
GLM4_QUESTION = "What's the Celsius temperature in San Francisco?"
GLM4_TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "format": {
                    "type": "string",
                    "enum": ["celsius", "fahrenheit"],
                    "description": "The temperature unit to use. Infer this from the users location.",
                },
            },
            "required": ["location", "format"],
        },
    },
}]
GLM4_ARGUMENTS = "{\"location\": \"San Francisco, CA\", \"format\": \"celsius\"}"
GLM4_CALL_TURN = [
    {"role": "assistant", "content": None, "function_call": None, "tool_calls": [{
        "id": "call_1717912616815", "type": "function",
        "function": {"name": "get_current_weather", "arguments": GLM4_ARGUMENTS}}]},
    {"tool_call_id": "call_1717912616815", "role": "tool", "name": "get_current_weather", "content": "23°C"},
]
NAMES = {"get_current_weather", "get_weather"}


def chatglm3_text(messages: list[dict]) -> str:
    """The text THUDM's ChatGLM3 tokenizer (build_chat_input, as text) makes of the message list."""
    text = "[gMASK]sop"
    for m in messages:
        content = m["content"] + ("\n" + json.dumps(m["tools"], indent=4, ensure_ascii=False) if "tools" in m else "")
        text += f"<|{m['role']}|>{m.get('metadata', '')}\n{content}"
    return text + "<|assistant|>"


def test_chatglm3_lists_the_tools_in_a_system_message():
    messages = chat_messages("chatglm3", [{"role": "user", "content": CHATGLM3_QUESTION}], CHATGLM3_TOOLS)
    assert messages == [{"role": "system", "content": CHATGLM3_PROMPT, "tools": CHATGLM3_TOOLS},
                        {"role": "user", "content": CHATGLM3_QUESTION}]
    # the demo server passes request.tools whole, so the JSON lists {"type", "function"} objects
    assert chatglm3_text(messages).startswith(
        f"[gMASK]sop<|system|>\n{CHATGLM3_PROMPT}\n[\n    {{\n        \"type\": \"function\",\n        \"function\": {{\n")
    assert chatglm3_text(messages).endswith(f"\n    }}\n]<|user|>\n{CHATGLM3_QUESTION}<|assistant|>")


def test_glm4_puts_the_tools_on_a_system_message_without_content():
    messages = chat_messages("glm4", [{"role": "user", "content": GLM4_QUESTION}], GLM4_TOOLS)
    assert messages == [{"role": "system", "content": None, "tools": GLM4_TOOLS}, {"role": "user", "content": GLM4_QUESTION}]


@pytest.mark.parametrize("family", ["chatglm3", "glm4"])
def test_the_tools_system_message_replaces_the_first_system_message(family):
    request = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert chat_messages(family, request, GLM4_TOOLS)[1:] == [{"role": "user", "content": "hi"}]
    assert chat_messages(family, request, None) == request
    assert chat_messages(family, request, []) == request


def test_glm4_call_and_observation_round_trip():
    request = [{"role": "user", "content": GLM4_QUESTION}, *GLM4_CALL_TURN]
    assert chat_messages("glm4", request, GLM4_TOOLS)[2:] == [
        {"role": "assistant", "metadata": "get_current_weather", "content": GLM4_ARGUMENTS},
        {"role": "observation", "content": "23°C"}]
    answer = "get_current_weather\n" + GLM4_ARGUMENTS
    assert parse_tool_call("glm4", answer, NAMES) == ToolCall("get_current_weather", GLM4_ARGUMENTS)


def test_chatglm3_call_is_rendered_as_its_tool_call_block_and_parses_back():
    arguments = json.dumps({"location": "北京", "unit": "celsius"}, ensure_ascii=False)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    request = [{"role": "user", "content": "今天北京的天气怎么样？"},
               {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 22}"},
               {"role": "assistant", "content": "根据查询结果，今天北京的气温为 22 摄氏度。"}]
    messages = chat_messages("chatglm3", request, None)
    body = "```python\ntool_call(location='北京', unit='celsius')\n```"
    assert messages == [request[0], {"role": "assistant", "metadata": "get_weather", "content": body},
                        {"role": "observation", "content": "{\"temperature\": 22}"}, request[3]]
    assert parse_tool_call("chatglm3", "get_weather\n" + body, NAMES) == ToolCall("get_weather", arguments)


def test_glm4_plain_assistant_turn_has_empty_metadata():
    request = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好👋！\n有什么可以帮你？\n"},
               {"role": "user", "content": "谢谢"}]
    assert chat_messages("glm4", request, None)[1] == {"role": "assistant", "metadata": "", "content": "你好👋！\n有什么可以帮你？"}


@pytest.mark.parametrize("request_messages", [
    [{"role": "tool", "tool_call_id": "call_1", "content": "23°C"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "tool", "content": "x"}],
    [{"role": "user", "content": GLM4_QUESTION}, GLM4_CALL_TURN[0], {**GLM4_CALL_TURN[1], "tool_call_id": "call_2"}],
    [{"role": "function", "name": "get_current_weather", "content": "23°C"}],
    [{"role": "user", "content": None}],
    [{"role": "assistant", "content": None}],
    [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "get_weather", "arguments": "北京"}}]}],
    [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "get_weather", "arguments": "[1]"}}]}],
    [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "a\nb", "arguments": "{}"}}]}],
])
@pytest.mark.parametrize("family", ["chatglm3", "glm4"])
def test_unrenderable_requests_raise_value_error(family, request_messages):
    with pytest.raises(ValueError):
        chat_messages(family, request_messages, GLM4_TOOLS)


@pytest.mark.parametrize("tools", [[{"type": "function"}], [{"name": "get_weather"}], [{"type": "cogview"}]])
def test_tools_must_be_named_functions(tools):
    with pytest.raises(ValueError):
        chat_messages("glm4", [{"role": "user", "content": "hi"}], tools)


def test_chatglm3_cannot_render_an_argument_that_is_no_python_name():
    call = {"id": "c", "function": {"name": "get_weather", "arguments": "{\"class\": 1}"}}
    request = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    with pytest.raises(ValueError):
        chat_messages("chatglm3", request, None)
    with pytest.raises(ValueError):
        chat_messages("chatglm2", [{"role": "user", "content": "hi"}], None)


@pytest.mark.parametrize("text, arguments", [
    # THUDM/ChatGLM3 PROMPT.md, the tool-calling example
    ("get_current_weather\n```python\ntool_call(location=\"beijing\", unit=\"celsius\")\n```",
     {"location": "beijing", "unit": "celsius"}),
    ("\nget_weather\n```python\ntool_call(location='北京', unit='celsius')\n```\n", {"location": "北京", "unit": "celsius"}),
    ("get_weather\n```python\ntool_call(\n    city={'name': '上海', 'ids': [1, 2.5, -3]},\n"
     "    days=(1, 2), hourly=True, unit=None\n)\n```",
     {"city": {"name": "上海", "ids": [1, 2.5, -3]}, "days": [1, 2], "hourly": True, "unit": None}),
    ("get_weather\n```python\ntool_call()\n```", {}),
])
def test_chatglm3_calls_parse(text, arguments):
    call = parse_tool_call("chatglm3", text, NAMES)
    assert call is not None and call.name == text.strip().split("\n")[0]
    assert call.arguments == json.dumps(arguments, ensure_ascii=False)


@pytest.mark.parametrize("body", [
    "tool_call(__import__('os').system('x'))",
    "tool_call(cmd=__import__('os').system('x'))",
    "tool_call('北京')",
    "tool_call(**{'location': '北京'})",
    "tool_call(location='北京', location='上海')",
    "os.system('x')",
    "get_weather(location='北京')",
    "tool_call(location='北京'",
    "tool_call(location=city)",
    "tool_call(ids={1, 2})",
    "tool_call(x=1e999)",
    "tool_call(x=b'bytes')",
    "tool_call(x=" + "[" * 10000 + "]" * 10000 + ")",
])
def test_chatglm3_rejects_anything_but_literal_keyword_arguments(body):
    assert parse_tool_call("chatglm3", f"get_weather\n```python\n{body}\n```", NAMES) is None


@pytest.mark.parametrize("text", [
    "get_weather\ntool_call(location='北京')",
    "unknown_tool\n```python\ntool_call(location='北京')\n```",
    "get_weather",
    "北京今天晴，气温 22 摄氏度。",
])
def test_chatglm3_other_answers_are_not_calls(text):
    assert parse_tool_call("chatglm3", text, NAMES) is None


def test_glm4_parses_json_arguments_and_keeps_non_ascii():
    call = parse_tool_call("glm4", "\nget_weather\n{\"location\": \"北京\", \"days\": [1, {\"hourly\": true}]}\n", NAMES)
    assert call == ToolCall("get_weather", "{\"location\": \"北京\", \"days\": [1, {\"hourly\": true}]}")
    pretty = "get_weather\n{\n  \"location\": \"北京\"\n}"
    assert parse_tool_call("glm4", pretty, NAMES) == ToolCall("get_weather", "{\"location\": \"北京\"}")


@pytest.mark.parametrize("text", [
    "get_weather\n{location: 北京}",
    "get_weather\n[\"北京\"]",
    "get_weather\n\"北京\"",
    "get_weather\n{\"location\": NaN}",
    "get_weather\n{\"location\": \"北京\"} and more",
    "unknown_tool\n{\"location\": \"北京\"}",
    "get_weather",
    "北京今天晴。\n{\"location\": \"北京\"}",
    "get_weather\n```python\ntool_call(location='北京')\n```",
])
def test_glm4_other_answers_are_not_calls(text):
    assert parse_tool_call("glm4", text, NAMES) is None


@pytest.mark.parametrize("text, held", [
    ("", True),
    ("\n", True),
    ("\nget_", True),
    ("get_current_weather", True),
    ("get_weather  ", True),
    ("get_weather\n", True),
    ("get_weather\n{\"location\"", True),
    ("get_weather\n```python\ntool_call(", True),
    ("get_weatherman", False),
    ("get weather", False),
    ("北京", False),
    ("Hello", False),
    ("get_weather is a tool\n", False),
    ("get\nweather", False),
])
def test_may_become_tool_call(text, held):
    assert may_become_tool_call(text, NAMES) is held


def test_no_tools_means_nothing_is_held_back():
    assert not may_become_tool_call("", set())
    assert parse_tool_call("glm4", "get_weather\n{}", set()) is None
