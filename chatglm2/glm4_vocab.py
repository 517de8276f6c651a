"""A small GLM-4 tokenizer for random checkpoints, tests and demos: byte-level BPE ranks learned from a corpus and
padded to glm-4-9b-chat's 151,329 ranks, so that the special tokens, config.json's eos_token_id [151329, 151336, 151338]
and padded_vocab_size 151552 are the published ones; written in THUDM's file formats."""
import base64
import heapq
import itertools
import json
import string
from collections import Counter, defaultdict
from pathlib import Path

import regex

from chatglm2.glm4_tokenizer import PATTERN, SPECIAL_TOKENS

RANKS = 151_329  # glm-4-9b-chat's tokenizer.model holds this many; <|endoftext|> takes the next id
MERGES = 1500
# glm-4-9b-chat's chat_template, exactly as the tokenizer_config.json of THUDM/glm-4-9b-chat on the Hugging Face Hub
# carries it (the Hub lists that file at 6,153 bytes, commit eb00b28). Read from public copies: the wording "名为 ChatGLM"
# from ShishirPatil/gorilla berkeley-function-call-leaderboard/bfcl_eval/model_handler/local_inference/glm.py (which
# quotes the file's "chat_template" line) and llama.cpp's tests/test-chat-template.cpp; the tool texts match THUDM/GLM-4
# demo/composite_demo/src/conversation.py; the file's other keys follow JaredNie/GLM-4 glm-4-9b-chat/tokenizer_config.json
# (a copy with an edited system prompt). That file rebuilt with this string has the Hub's 6,153 bytes; the older
# "名为 GLM-4" wording would give 6,151.
GLM4_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>\n"
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n"
    "# 可用工具{% set tools = item['tools'] %}{% for tool in tools %}{% if tool['type'] == 'function' %}\n\n"
    "## {{ tool['function']['name'] }}\n\n"
    "{{ tool['function'] | tojson(indent=4) }}\n"
    "在调用上述函数时，请使用 Json 格式表示调用的参数。"
    "{% elif tool['type'] == 'python' %}\n\n"
    "## python\n\n"
    "当你向 `python` 发送包含 Python 代码的消息时，该代码将会在一个有状态的 Jupyter notebook 环境中执行。\n"
    "`python` 返回代码执行的输出，或在执行 60 秒后返回超时。\n"
    "`/mnt/data` 将会持久化存储你的文件。在此会话中，`python` 无法访问互联网。"
    "不要使用 `python` 进行任何网络请求或者在线 API 调用，这些在线内容的访问将不会成功。"
    "{% elif tool['type'] == 'simple_browser' %}\n\n"
    "## simple_browser\n\n"
    "你可以使用 `simple_browser` 工具。该工具支持以下函数：\n"
    "`search(query: str, recency_days: int)`：使用搜索引擎进行查询并显示结果，"
    "可以使用 `recency_days` 参数控制搜索内容的时效性。\n"
    "`mclick(ids: list[int])`：获取一系列指定 id 的页面内容。每次调用时，须选择3-10个页面。选择多个角度的页面，"
    "同时尽可能选择可信任的信息来源。考虑到部分页面是无法加载的，你也可以多打开一些可能有用的页面而不用担心内容过多。\n"
    "`open_url(url: str)`：打开指定的 URL。\n\n"
    "使用 `【{引用 id}†{引用文本}】` 来引用内容。\n\n"
    "操作步骤：1. 使用 `search` 来获得信息列表; 2. 使用 `mclick` 来获取指定 ID 页面的内容; 3. 根据获得的内容进行回复。"
    "在回复中应当引用信息来源。\n"
    " 如果用户提供了 URL，也可以用 `open_url` 直接打开页面。\n"
    "如果初次搜索结果没有找到合适的信息，也可以再次使用 `search` 进行搜索。"
    "{% elif tool['type'] == 'cogview' %}\n\n"
    "## cogview\n\n"
    "如果用户的请求中包含了对图像的描述，你可以使用 `cogview` 来生成图像并展示给用户。你需要向 `cogview` 发送图像描述，"
    "规则：\n"
    "- 发送给 `cogview` 的消息必须使用英语。用户的中文描述必须完全翻译为英语。\n"
    "- 应当尽可能详细地描述图像生成的需求，需求描述约 100 英文单词。\n"
    "- 保持用户原始描述的意图。不要虚构内容或者没见过的人物。\n"
    "- 如无特殊说明，所在地为中国，持有中国立场并遵循中国社会主义价值观。{% endif %}{% endfor %}{% endif %}"
    "{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n"
    "{{ item['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _merge(word: list[bytes], pair: tuple[bytes, bytes], token: bytes) -> list[bytes]:
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(token)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


def learn_merges(text: str, count: int) -> list[bytes]:
    """Greedy byte-level BPE within the pieces PATTERN splits the text into: merge the most frequent adjacent pair
    (ties: the smaller pair) until `count` new tokens are made or no pair occurs twice. Returns them in merge order."""
    pieces = Counter(regex.findall(PATTERN, text))
    words = [[bytes([b]) for b in piece.encode()] for piece in pieces]
    frequencies = list(pieces.values())
    pair_counts, holders = Counter(), defaultdict(set)
    for index, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += frequencies[index]
            holders[pair].add(index)
    # A heap of (-count, pair) instead of a max() over every pair per merge; entries whose count changed are stale.
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)
    known, tokens = {bytes([b]) for b in range(256)}, []
    while heap and len(tokens) < count:
        negative, pair = heapq.heappop(heap)
        if -negative != pair_counts[pair]:
            continue
        if -negative < 2:
            break
        token = pair[0] + pair[1]
        if token not in known:  # a+bc after ab+c makes no new token
            known.add(token)
            tokens.append(token)
        changed = set()
        for index in holders.pop(pair):
            word, frequency = words[index], frequencies[index]
            for old in zip(word, word[1:]):
                pair_counts[old] -= frequency
                changed.add(old)
            words[index] = word = _merge(word, pair, token)
            for new in zip(word, word[1:]):
                pair_counts[new] += frequency
                holders[new].add(index)
                changed.add(new)
        for changed_pair in changed:
            if pair_counts[changed_pair] > 0:
                heapq.heappush(heap, (-pair_counts[changed_pair], changed_pair))
    return tokens


def write_glm4_tokenizer(directory: Path, corpus: Path) -> None:
    """Write tokenizer.model (THUDM's `base64(token) rank` lines) and tokenizer_config.json (glm-4-9b-chat's keys,
    chat_template and added tokens) into directory: the 256 bytes as ranks 0..255, the merges learned from corpus,
    then filler up to 151,329 ranks."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokens = [bytes([b]) for b in range(256)] + learn_merges(Path(corpus).read_text(encoding="utf-8"), MERGES)
    # Filler starts with 0xff, a byte UTF-8 never uses, so no text ever encodes to it; three ASCII letters or digits
    # follow, so that the filler a random model samples decodes to U+FFFD and printable text, never control characters.
    suffixes = itertools.product((string.digits + string.ascii_letters).encode(), repeat=3)
    tokens += [b"\xff" + bytes(suffix) for suffix in itertools.islice(suffixes, RANKS - len(tokens))]
    (directory / "tokenizer.model").write_bytes(
        b"".join(base64.b64encode(token) + b" %d\n" % rank for rank, token in enumerate(tokens)))
    config = {
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},  # never executed here
        "added_tokens_decoder": {
            str(RANKS + i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True} for i, token in enumerate(SPECIAL_TOKENS)},
        "additional_special_tokens": list(SPECIAL_TOKENS),
        "clean_up_tokenization_spaces": False,
        "chat_template": GLM4_CHAT_TEMPLATE,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 128000,
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "ChatGLM4Tokenizer",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                                     encoding="utf-8")
