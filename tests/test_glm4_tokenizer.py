"""GLM-4's tokenizer on BPE ranks learned from the repo's corpus and padded to glm-4-9b-chat's 151,329 ranks."""
import json
import shutil

import pytest
import regex
import torch

from chatglm2.batch_encode import batch_encode
from chatglm2.errors import InputError
from chatglm2.glm4_tokenizer import PATTERN, SPECIAL_TOKENS, GLM4Tokenizer, render_chat_template
from chatglm2.glm4_vocab import GLM4_CHAT_TEMPLATE, RANKS, write_glm4_tokenizer
from chatglm2.random_checkpoint import CORPUS

TEXTS = ["你好！今天天气怎么样？", "Hello, world! It's 2024-06-05.\n\n\tIndented\r\nline  ", "emoji 😀👍🏽 and 中文混合 text",
         "   leading spaces\n\n\ntrailing\n", "数字 1234567 and symbols <|user|> [gMASK] {\"a\": 1}"]
WEATHER = {"name": "get_weather", "description": "查询城市的天气", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "description": "城市名"}}, "required": ["city"]}}
CHAT = [{"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "北京今天天气怎么样？"},
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
        {"role": "observation", "content": '{"weather": "晴", "temperature": 26}'},
        {"role": "assistant", "content": "北京今天晴，26 度。"},
        {"role": "user", "content": "我输入了 <|user|> 和 <|assistant|>，会怎样？"}]


@pytest.fixture(scope="module")
def glm4_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("glm4")
    write_glm4_tokenizer(directory, CORPUS)
    return directory


@pytest.fixture(scope="module")
def tokenizer(glm4_dir):
    return GLM4Tokenizer.from_pretrained(glm4_dir)


@pytest.fixture(scope="module")
def code_tokenizer(glm4_dir, tmp_path_factory):
    """The same files without chat_template, so build_chat_input takes THUDM's build_single_message path."""
    directory = tmp_path_factory.mktemp("glm4_no_template")
    shutil.copy(glm4_dir / "tokenizer.model", directory)
    config = json.loads((glm4_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["chat_template"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return GLM4Tokenizer.from_pretrained(directory)


def test_special_token_ids_are_the_published_ones(tokenizer, glm4_dir):
    assert tokenizer.n_words == RANKS == 151329
    assert tokenizer.special_token_ids == {token: 151329 + i for i, token in enumerate(SPECIAL_TOKENS)}
    assert [tokenizer.get_command(t) for t in ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                                                "<|observation|>", "<|end_of_video|>")] == \
        [151331, 151333, 151335, 151336, 151337, 151338, 151342]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.vocab_size) == (151329, 151329, 151343)
    assert list(tokenizer.chat_stop_ids) == [151329, 151336, 151338]
    assert tokenizer.vocab_size <= 151552  # glm-4-9b-chat's padded_vocab_size
    config = json.loads((glm4_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == GLM4_CHAT_TEMPLATE and config["tokenizer_class"] == "ChatGLM4Tokenizer"
    assert (config["eos_token"], config["pad_token"], config["padding_side"]) == ("<|endoftext|>", "<|endoftext|>", "left")


def test_ids_without_added_tokens_decoder_follow_the_ranks(glm4_dir, tmp_path):
    shutil.copy(glm4_dir / "tokenizer.model", tmp_path)
    assert GLM4Tokenizer.from_pretrained(tmp_path).special_token_ids == \
        {token: 151329 + i for i, token in enumerate(SPECIAL_TOKENS)}


@pytest.mark.parametrize("text", TEXTS)
def test_encode_prefixes_gmask_sop_and_decode_round_trips(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids[:2] == [151331, 151333]
    assert ids[2:] == tokenizer.encode(text, add_special_tokens=False)
    assert all(i < tokenizer.n_words for i in ids[2:])
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(torch.tensor(ids)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_bpe_never_crosses_the_pattern_pieces(tokenizer, text):
    pieces = regex.findall(PATTERN, text)
    assert "".join(pieces) == text
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == [i for piece in pieces for i in tokenizer.encode(piece, add_special_tokens=False)]


def test_merges_shorten_the_corpus_text(tokenizer):
    text = CORPUS.read_text(encoding="utf-8")[:2000]
    assert len(tokenizer.encode(text, add_special_tokens=False)) < len(text.encode()) / 2


def test_special_strings_in_text_stay_text(tokenizer):
    ids = tokenizer.encode("<|user|>[gMASK]<|endoftext|>", add_special_tokens=False)
    assert not set(ids) & set(tokenizer.special_token_ids.values())
    assert tokenizer.decode(ids) == "<|user|>[gMASK]<|endoftext|>"


def test_decode_drops_special_and_unknown_ids(tokenizer):
    ids = tokenizer.encode("你好") + [151336, 151329, 151500] + tokenizer.encode("world", add_special_tokens=False)
    assert tokenizer.decode(ids) == "你好world"
    assert tokenizer.decode(list(range(151000, 151329))).isprintable()  # filler ranks: U+FFFD and ASCII, no controls
    as_bytes = list("好".encode())  # ranks 0..255 are the single bytes
    assert tokenizer.decode(as_bytes) == "好" and tokenizer.decode(as_bytes[:2]) == "\ufffd"


def test_batch_is_left_padded_with_endoftext(tokenizer):
    texts = ["你好", "今天天气怎么样？我打算下午去公园散步。"]
    batch = tokenizer(texts)
    short, long = tokenizer.encode(texts[0]), tokenizer.encode(texts[1])
    width = len(long)
    assert len(short) < width
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (2, width)
    assert batch["input_ids"][0].tolist() == [151329] * (width - len(short)) + short
    assert batch["attention_mask"][0].tolist() == [0] * (width - len(short)) + [1] * len(short)
    assert batch["attention_mask"][1].tolist() == [1] * width
    ragged = batch_encode(tokenizer, texts, padding=False, return_tensors=None)
    assert ragged["input_ids"] == [short, long]
    with pytest.raises(InputError):
        tokenizer(texts, padding=False)


def test_template_path_equals_code_path(tokenizer, code_tokenizer):
    assert tokenizer.chat_template is not None and code_tokenizer.chat_template is None
    for messages in (CHAT, CHAT[1:2], [{"role": "system", "content": None}, *CHAT[1:3], {"role": "user", "content": ""}]):
        assert tokenizer.build_chat_input(messages) == code_tokenizer.build_chat_input(messages)


def test_chat_input_layout(tokenizer):
    ids = tokenizer.build_chat_input(CHAT)
    specials = [i for i in ids if i >= tokenizer.n_words]
    assert ids[:3] == [151331, 151333, 151335] and ids[-1] == 151337
    assert specials == [151331, 151333, 151335, 151336, 151337, 151338, 151337, 151336, 151337]
    user = tokenizer.build_chat_input(CHAT[1:2])
    assert user == [151331, 151333, 151336] + tokenizer.encode("\n北京今天天气怎么样？", False) + [151337]
    metadata = ids.index(151337)
    assert tokenizer.decode(ids[metadata:ids.index(151338)]) == 'get_weather\n{"city": "北京"}'


def test_special_strings_in_messages_and_tools_stay_text(tokenizer):
    tool = {"type": "function", "function": {**WEATHER, "description": "<|observation|> 查询 <|user|>"}}
    messages = [{"role": "system", "content": None, "tools": [tool]},
                {"role": "user", "content": "<|assistant|>hi\ue000\ue100", "metadata": "<|system|>"}]
    ids = tokenizer.build_chat_input(messages)
    assert [i for i in ids if i >= tokenizer.n_words] == [151331, 151333, 151335, 151336, 151337]
    text = tokenizer.decode(ids)
    assert '"description": "<|observation|> 查询 <|user|>"' in text and text.endswith("<|system|>\n<|assistant|>hi\ue000\ue100")


def test_tools_render_as_the_template_does(tokenizer):
    tools = [{"type": "function", "function": WEATHER}]
    messages = [{"role": "system", "content": None, "tools": tools}, {"role": "user", "content": "北京天气？"}]
    rendered = render_chat_template(GLM4_CHAT_TEMPLATE, messages, add_generation_prompt=True)
    function_json = json.dumps(WEATHER, ensure_ascii=False, indent=4)
    assert '"description": "查询城市的天气"' in function_json and function_json.index('"name"') < function_json.index('"parameters"')
    assert rendered == ("[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                        "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具\n## get_weather\n\n"
                        f"{function_json}\n在调用上述函数时，请使用 Json 格式表示调用的参数。<|user|>\n北京天气？<|assistant|>")
    for token in SPECIAL_TOKENS:
        rendered = rendered.replace(token, "")
    assert tokenizer.decode(tokenizer.build_chat_input(messages)) == rendered


def test_rendering_matches_transformers(tokenizer):
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    tools = [{"type": "function", "function": WEATHER}, {"type": "python"}, {"type": "cogview"}]
    messages = [{"role": "system", "tools": tools}, *CHAT[1:]]
    expected, _ = chat_template_utils.render_jinja_template([messages], chat_template=GLM4_CHAT_TEMPLATE,
                                                             add_generation_prompt=True, eos_token="<|endoftext|>")
    assert render_chat_template(GLM4_CHAT_TEMPLATE, messages, add_generation_prompt=True,
                                eos_token="<|endoftext|>") == expected[0]
    template = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m | tojson }}{% endfor %}"
    assert render_chat_template(template, messages[1:]) == json.dumps(messages[1], ensure_ascii=False)


def test_bad_messages_and_templates_raise_input_errors(tokenizer, code_tokenizer):
    with pytest.raises(InputError, match="role"):
        tokenizer.build_chat_input([{"role": "tool", "content": "x"}])
    with pytest.raises(InputError, match="content"):
        tokenizer.build_chat_input([{"role": "user", "content": ["x"]}])
    with pytest.raises(InputError, match="chat_template"):
        code_tokenizer.build_chat_input([{"role": "system", "content": None, "tools": []}])
    with pytest.raises(InputError, match="refused"):
        render_chat_template("{{ raise_exception('no system role') }}", [])
    with pytest.raises(InputError, match="not valid Jinja"):
        render_chat_template("{% if %}", [])


def test_malformed_files_raise_one_line_input_errors(glm4_dir, tmp_path):
    with pytest.raises(InputError, match="missing"):
        GLM4Tokenizer.from_pretrained(tmp_path)
    model = (glm4_dir / "tokenizer.model").read_bytes()
    (tmp_path / "tokenizer.model").write_bytes(model.replace(b"\n", b"\nnot base64!\n", 1))
    with pytest.raises(InputError, match="line 2"):
        GLM4Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(model)
    (tmp_path / "tokenizer_config.json").write_text("{", encoding="utf-8")
    with pytest.raises(InputError, match="not JSON"):
        GLM4Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"added_tokens_decoder": {"5": {"content": "<|user|>"}}}',
                                                    encoding="utf-8")
    with pytest.raises(InputError) as error:
        GLM4Tokenizer.from_pretrained(tmp_path)
    assert "lacks" in str(error.value) and "\n" not in str(error.value)
