"""The ChatGLM2 tokenizer: SentencePiece plus five special tokens, written here rather than loaded from a checkpoint."""
from pathlib import Path
from typing import Sequence

import sentencepiece
import torch

from chatglm2.errors import InputError

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")


class ChatGLM2Tokenizer:
    """Behaves like THUDM's tokenization_chatglm.py: `[gMASK] sop` prefix, left padding, pad = unk = 0."""

    def __init__(self, model_file: str | Path):
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.n_words = self.sp.vocab_size()
        self.special_token_ids = {token: self.n_words + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.bos_token_id = self.sp.bos_id()
        self.eos_token_id = self.sp.eos_id()
        self.pad_token_id = self.sp.unk_id()
        self.vocab_size = self.n_words + len(SPECIAL_TOKENS)
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
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.encode(text, add_special_tokens) for text in texts]
        longest = max(len(row) for row in rows)
        if not padding and any(len(row) != longest for row in rows) and return_tensors == "pt":
            raise InputError("rows of different lengths need padding=True to become one tensor")
        width = longest if padding else None
        input_ids = [[self.pad_token_id] * ((width or len(row)) - len(row)) + row for row in rows]
        attention_mask = [[0] * ((width or len(row)) - len(row)) + [1] * len(row) for row in rows]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(input_ids, dtype=torch.long),
                    "attention_mask": torch.tensor(attention_mask, dtype=torch.long)}
        return {"input_ids": input_ids, "attention_mask": attention_mask}
