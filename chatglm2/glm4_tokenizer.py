"""GLM-4's tokenizer, as THUDM's ChatGLM4Tokenizer (tokenization_chatglm.py of glm-4-9b-chat) behaves: tiktoken BPE ranks
from tokenizer.model, fourteen special tokens after them, and chat input rendered from the checkpoint's Jinja
chat_template as transformers' apply_chat_template renders it."""
import base64
import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import jinja2
import tiktoken
import torch
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from chatglm2.batch_encode import batch_encode
from chatglm2.errors import InputError

# THUDM's pre-tokenizer split; \p{L} and \p{N} need tiktoken's or the `regex` module's engine, not `re`.
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
# In id order from the first id after the BPE ranks (151329 in glm-4-9b-chat).
SPECIAL_TOKENS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                  "<|end_of_video|>")
ROLES = ("system", "user", "assistant", "observation")
NEEDED = ("<|endoftext|>", "[gMASK]", "<sop>") + tuple(f"<|{role}|>" for role in ROLES)
# While a template renders, a special-token string inside user-supplied text stands as ESCAPE plus a private-use mark
# (and ESCAPE itself as ESCAPE twice), so that only the strings the template writes become special ids.
ESCAPE = "\ue000"
FIRST_MARK = 0xE100
ESCAPED = re.compile(f"{ESCAPE}(.)", re.S)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: tuple | None = None,
            sort_keys: bool = False) -> str:
    # transformers' filter: Jinja's own tojson escapes HTML characters and sorts keys.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        return environment.from_string(template)
    except jinja2.TemplateSyntaxError as error:
        raise InputError(f"the chat template is not valid Jinja (line {error.lineno}: {error.message}); restore "
                         f"tokenizer_config.json's chat_template from the original checkpoint") from None


def render_chat_template(template: str, messages: Sequence[dict], **extra: Any) -> str:
    """Render a chat template as transformers' apply_chat_template(tokenize=False) does: a sandboxed Jinja
    environment with trim_blocks, lstrip_blocks, loop controls, its tojson, raise_exception and strftime_now; message
    keys whose value is None are dropped first; tools and documents default to None and add_generation_prompt to
    False; `extra` adds or overrides variables (transformers passes the special-token names such as eos_token)."""
    context = {"tools": None, "documents": None, "add_generation_prompt": False, **extra,
               "messages": [{key: value for key, value in message.items() if value is not None} for message in messages]}
    try:
        return _compile(template).render(**context)
    except jinja2.TemplateError as error:
        raise InputError(f"the chat template refused these messages: {error}") from None


def read_ranks(model_file: Path) -> dict[bytes, int]:
    """tokenizer.model in THUDM's format: one `base64(token bytes) rank` per line, ranks 0..n-1."""
    ranks = {}
    for number, line in enumerate(model_file.read_bytes().splitlines(), 1):
        try:
            token, rank = line.split()
            token = base64.b64decode(token, validate=True)
            rank = int(rank)
        except ValueError:  # also binascii.Error
            raise InputError(f"{model_file} line {number} is not `base64-token rank`; restore tokenizer.model from "
                             f"the original checkpoint") from None
        if token in ranks:
            raise InputError(f"{model_file} line {number} repeats a token; restore tokenizer.model from the original "
                             f"checkpoint")
        ranks[token] = rank
    if set(ranks.values()) != set(range(len(ranks))) or any(bytes([b]) not in ranks for b in range(256)):
        raise InputError(f"{model_file} must number its tokens 0..n-1 and hold all 256 single bytes; restore it from "
                         f"the original checkpoint")
    return ranks


def read_special_tokens(config: dict, n_words: int, config_file: Path) -> dict[str, int]:
    """The special tokens' ids: tokenizer_config.json's added_tokens_decoder, else THUDM's list after the ranks."""
    decoder = config.get("added_tokens_decoder")
    if decoder is None:
        return {token: n_words + i for i, token in enumerate(SPECIAL_TOKENS)}
    try:
        specials = {entry["content"]: int(token_id) for token_id, entry in decoder.items()}
    except (AttributeError, KeyError, TypeError, ValueError):
        specials = None
    if specials is None or not all(isinstance(token, str) for token in specials):
        raise InputError(f"{config_file}'s added_tokens_decoder must map ids to {{\"content\": token}} entries; "
                         f"restore it from the original checkpoint")
    missing = [token for token in NEEDED if token not in specials]
    if missing:
        raise InputError(f"{config_file}'s added_tokens_decoder lacks {', '.join(missing)}; restore it from the "
                         f"original checkpoint")
    inside = [token for token, token_id in specials.items() if token_id < n_words]
    if inside:
        raise InputError(f"{config_file} gives {inside[0]} the id {specials[inside[0]]}, which tokenizer.model's "
                         f"{n_words} ranks already use; restore the files from the original checkpoint")
    return specials


def _token_name(config: dict, key: str) -> str:
    value = config.get(key) or "<|endoftext|>"
    return value.get("content", "") if isinstance(value, dict) else value  # older files store AddedToken dicts


class GLM4Tokenizer:
    """THUDM's ChatGLM4Tokenizer with ChatGLM2Tokenizer's surface: `[gMASK]<sop>` prefix, left padding with
    <|endoftext|>. Text is encoded without special tokens, so typing "<|user|>" never forges a turn."""
    chat_family = "glm4"

    def __init__(self, ranks: dict[bytes, int], special_token_ids: dict[str, int], chat_template: str | None = None,
                 eos_token: str = "<|endoftext|>", pad_token: str = "<|endoftext|>"):
        self.encoding = tiktoken.Encoding("glm4", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={})
        self.n_words = len(ranks)  # the BPE ranks, as ChatGLM2Tokenizer's n_words counts SentencePiece's pieces
        self.special_token_ids = dict(special_token_ids)
        self.vocab_size = max(self.n_words, max(self.special_token_ids.values()) + 1)
        self.eos_token_id = self.get_command(eos_token)
        self.pad_token_id = self.get_command(pad_token)
        self.chat_template = chat_template
        self._template_tokens = {"eos_token": eos_token, "pad_token": pad_token}
        longest_first = sorted(self.special_token_ids, key=len, reverse=True)
        self._specials = re.compile(f"({'|'.join(map(re.escape, longest_first))})")
        self._marks = {token: ESCAPE + chr(FIRST_MARK + i) for i, token in enumerate(self.special_token_ids)}
        self._unmarks = {mark[1]: token for token, mark in self._marks.items()} | {ESCAPE: ESCAPE}

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "GLM4Tokenizer":
        path = Path(path)
        model_file, config_file = path / "tokenizer.model", path / "tokenizer_config.json"
        if not model_file.is_file():
            raise InputError(f"{model_file} is missing; the checkpoint directory must hold GLM-4's tokenizer.model")
        ranks = read_ranks(model_file)
        config = {}
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as error:
                raise InputError(f"{config_file} is not JSON ({error}); restore it from the original checkpoint") from None
        if not isinstance(config, dict):
            raise InputError(f"{config_file} must hold a JSON object; restore it from the original checkpoint")
        special_token_ids = read_special_tokens(config, len(ranks), config_file)
        # Recent transformers save the template as chat_template.jinja and load that file in preference.
        template_file = path / "chat_template.jinja"
        chat_template = config.get("chat_template")
        if template_file.is_file():
            chat_template = template_file.read_text(encoding="utf-8")
        if chat_template is not None and not isinstance(chat_template, str):
            raise InputError(f"{config_file}'s chat_template must be one Jinja string; restore it from the original checkpoint")
        eos_token, pad_token = _token_name(config, "eos_token"), _token_name(config, "pad_token")
        for name in (eos_token, pad_token):
            if name not in special_token_ids:
                raise InputError(f"{config_file} names {name!r} as eos or pad token, which is not one of its added "
                                 f"tokens; restore it from the original checkpoint")
        return cls(ranks, special_token_ids, chat_template, eos_token, pad_token)

    def get_command(self, token: str) -> int:
        return self.special_token_ids[token]

    @property
    def chat_stop_ids(self) -> tuple[int, ...]:
        """glm-4-9b-chat's generation stops (config.json's eos_token_id list)."""
        return self.eos_token_id, self.get_command("<|user|>"), self.get_command("<|observation|>")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.encoding.encode_ordinary(text)
        if add_special_tokens:  # THUDM's build_inputs_with_special_tokens
            ids = [self.get_command("[gMASK]"), self.get_command("<sop>")] + ids
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of the BPE ids, special and unknown ids dropped (skip_special_tokens=True); bytes are joined before
        decoding, so a character split across ids survives and a broken one becomes U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        kept = [i for i in ids if 0 <= i < self.n_words]
        return self.encoding.decode_bytes(kept).decode("utf-8", errors="replace")

    def __call__(self, texts: str | Sequence[str], padding: bool | str = True, return_tensors: str | None = "pt",
                 add_special_tokens: bool = True) -> dict:
        return batch_encode(self, texts, padding, return_tensors, add_special_tokens)

    def build_chat_input(self, messages: Sequence[dict]) -> list[int]:
        """The ids of a conversation ready for the assistant's answer. Messages hold role (system, user, assistant,
        observation), content (str or None), optional metadata (str) and optional tools (OpenAI tool dicts, as THUDM's
        GLM-4 server sends them in a `{"role": "system", "content": None, "tools": tools}` message). With a
        chat_template, it is rendered as transformers does and its own special-token strings become special ids;
        without one, the ids are built as THUDM's build_single_message builds them."""
        for index, message in enumerate(messages):
            check_message(index, message)
        if self.chat_template is None:
            return self._build_by_code(messages)
        rendered = render_chat_template(self.chat_template, self._escape(list(messages)), add_generation_prompt=True,
                                        **self._template_tokens)
        ids = []
        for index, piece in enumerate(self._specials.split(rendered)):  # text, special, text, ..., text
            if index % 2:
                ids.append(self.special_token_ids[piece])
            elif piece:
                ids += self.encoding.encode_ordinary(ESCAPED.sub(self._unescape, piece))
        return ids

    def _build_by_code(self, messages: Sequence[dict]) -> list[int]:
        ids = [self.get_command("[gMASK]"), self.get_command("<sop>")]
        for message in messages:
            if message.get("tools") is not None:
                raise InputError("tools need the chat_template of tokenizer_config.json, which this checkpoint lacks; "
                                 "restore that file from the original checkpoint")
            # Skipped without content, as the template's `{% if item['content'] %}` and THUDM's GLM-4V code skip it.
            if message.get("content"):
                ids += [self.get_command(f"<|{message['role']}|>")]
                ids += self.encoding.encode_ordinary(f"{message.get('metadata') or ''}\n")
                ids += self.encoding.encode_ordinary(message["content"])
        return ids + [self.get_command("<|assistant|>")]

    def _escape(self, value: Any) -> Any:
        """Every string (and dict key) of the messages with ESCAPE doubled and special-token strings marked."""
        if isinstance(value, str):
            return self._specials.sub(lambda match: self._marks[match[0]], value.replace(ESCAPE, ESCAPE * 2))
        if isinstance(value, dict):
            return {self._escape(key): self._escape(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._escape(item) for item in value]
        return value

    def _unescape(self, match: re.Match) -> str:
        return self._unmarks.get(match[1], match[0])


def check_message(index: int, message: Any) -> None:
    """One line on what is wrong with a chat message, as an InputError."""
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise InputError(f"message {index} must be a dict whose role is one of {', '.join(ROLES)}")
    for key in ("content", "metadata"):
        if message.get(key) is not None and not isinstance(message[key], str):
            raise InputError(f"message {index}'s {key} must be a string")
    if message.get("tools") is not None and not isinstance(message["tools"], list):
        raise InputError(f"message {index}'s tools must be a list of tool dicts")
