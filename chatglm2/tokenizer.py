"""The ChatGLM2 and ChatGLM3 tokenizers (SentencePiece plus special tokens, written here rather than loaded from a
checkpoint), and the choice among them and GLM-4's by the checkpoint's own files."""
import json
import re
from pathlib import Path
from typing import Sequence

import sentencepiece
import torch

from chatglm2.batch_encode import batch_encode
from chatglm2.errors import InputError
from chatglm2.glm4_tokenizer import GLM4Tokenizer

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
ROLES = ("system", "user", "assistant", "observation")
# What the pages and the API call each family's model: (title, model id)
MODEL_NAMES = {"chatglm2": ("ChatGLM2-6B", "chatglm2-6b"), "chatglm3": ("ChatGLM3-6B", "chatglm3-6b"),
               "glm4": ("GLM-4-9B-chat", "glm-4-9b-chat")}
TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+\r?\n")


class ChatGLM2Tokenizer:
    """Behaves like THUDM's tokenization_chatglm.py: `[gMASK] sop` prefix, left padding, pad = unk = 0."""
    special_tokens = SPECIAL_TOKENS
    chat_family = "chatglm2"

    def __init__(self, model_file: str | Path):
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.n_words = self.sp.vocab_size()
        self.special_token_ids = {token: self.n_words + i for i, token in enumerate(self.special_tokens)}
        self.bos_token_id = self.sp.bos_id()
        self.eos_token_id = self.sp.eos_id()
        self.pad_token_id = self.sp.unk_id()
        self.vocab_size = self.n_words + len(self.special_tokens)
        # Decoding drops these, as the original's _convert_id_to_token maps them to "".
        self._dropped_ids = set(self.special_token_ids.values()) | {self.bos_token_id, self.eos_token_id, self.pad_token_id}

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ChatGLM2Tokenizer":
        model_file = Path(path) / "tokenizer.model"
        if not model_file.is_file():
            raise InputError(f"{model_file} is missing; the checkpoint directory must hold the SentencePiece tokenizer.model")
        try:
            return cls(model_file)
        except (RuntimeError, OSError) as error:  # SentencePiece's parse failure is a RuntimeError
            raise InputError(f"{model_file} is not a SentencePiece model ({str(error).splitlines()[0]}); restore it "
                             f"from the original checkpoint") from None

    def get_command(self, token: str) -> int:
        return self.special_token_ids[token]

    @property
    def chat_stop_ids(self) -> tuple[int, ...]:
        return (self.eos_token_id,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        if add_special_tokens:
            ids = [self.get_command("[gMASK]"), self.get_command("sop")] + ids
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        kept = [i for i in ids if i not in self._dropped_ids and 0 <= i < self.n_words]
        return self.sp.decode(kept)

    @staticmethod
    def build_prompt(query: str, history: Sequence[tuple[str, str]] | None = None) -> str:
        prompt = ""
        for i, (old_query, response) in enumerate(history or []):
            prompt += f"[Round {i + 1}]\n\n问：{old_query}\n\n答：{response}\n\n"
        return prompt + f"[Round {len(history or []) + 1}]\n\n问：{query}\n\n答："

    def __call__(self, texts: str | Sequence[str], padding: bool | str = True, return_tensors: str | None = "pt",
                 add_special_tokens: bool = True) -> dict:
        """Encode a batch, left-padded to the longest row; pad positions get attention_mask 0."""
        return batch_encode(self, texts, padding, return_tensors, add_special_tokens)


class ChatGLM3Tokenizer(ChatGLM2Tokenizer):
    """THUDM's ChatGLM3 tokenizer: ChatGLM2's plus four role tokens. Text is encoded by SentencePiece alone, so a role
    token never comes from what someone typed (a message cannot forge a turn)."""
    special_tokens = SPECIAL_TOKENS + tuple(f"<|{role}|>" for role in ROLES)
    chat_family = "chatglm3"

    @property
    def chat_stop_ids(self) -> tuple[int, ...]:
        return self.eos_token_id, self.get_command("<|user|>"), self.get_command("<|observation|>")

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        if role not in ROLES:
            raise InputError(f"a message has role {role!r}; ChatGLM3 knows {', '.join(ROLES)}")
        return [self.get_command(f"<|{role}|>")] + self.sp.encode(f"{metadata}\n") + self.sp.encode(message)

    def build_chat_input(self, messages: Sequence[dict]) -> list[int]:
        """THUDM's build_chat_input over a whole conversation: `[gMASK] sop`, each message (a system message's tools
        appended as indented JSON), then `<|assistant|>` for the answer."""
        ids = [self.get_command("[gMASK]"), self.get_command("sop")]
        for message in messages:
            content = message.get("content") or ""
            if message["role"] == "system" and message.get("tools"):
                content += "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
            ids += self.build_single_message(message["role"], message.get("metadata") or "", content)
        return ids + [self.get_command("<|assistant|>")]


def chatglm3_files(path: Path) -> bool:
    """ChatGLM3's files name it (config's _name_or_path, tokenizer_config's name_or_path) or list its role tokens
    (tokenizer_config's added tokens); ChatGLM2's do neither."""
    found = []
    for name in ("config.json", "tokenizer_config.json"):
        try:
            found.append(json.loads((path / name).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    for settings in found:
        names = f"{settings.get('_name_or_path', '')} {settings.get('name_or_path', '')}".lower()
        if "chatglm3" in names or "<|user|>" in json.dumps(settings.get("added_tokens_decoder", {})) + \
                json.dumps(settings.get("additional_special_tokens", [])):
            return True
    return False


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer, chosen by its files: GLM-4's when tokenizer.model holds tiktoken ranks,
    ChatGLM3's when the files name ChatGLM3, ChatGLM2's otherwise."""
    path = Path(path)
    model_file = path / "tokenizer.model"
    if not model_file.is_file() and (path / "tokenizer.json").is_file():
        raise InputError(f"{path} has transformers' tokenizer.json but no tokenizer.model, which is what is read here; "
                         f"copy tokenizer.model and tokenizer_config.json from the same model's THUDM repository "
                         f"(e.g. THUDM/glm-4-9b-chat for glm-4-9b-chat-hf)")
    if model_file.is_file():
        with open(model_file, "rb") as f:
            if TIKTOKEN_LINE.match(f.readline(4096)):
                return GLM4Tokenizer.from_pretrained(path)
    return (ChatGLM3Tokenizer if chatglm3_files(path) else ChatGLM2Tokenizer).from_pretrained(path)
