"""Batch encoding shared by the tokenizers: THUDM's tokenizers pad on the left, so that every row of a batch ends at
its last real token and generation appends at the same position."""
from typing import Protocol, Sequence

import torch

from chatglm2.errors import InputError


class Encoder(Protocol):
    pad_token_id: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


def batch_encode(tokenizer: Encoder, texts: str | Sequence[str], padding: bool | str = True,
                 return_tensors: str | None = "pt", add_special_tokens: bool = True) -> dict:
    """Encode a batch, left-padded with pad_token_id to the longest row; pad positions get attention_mask 0. Without
    padding, rows of different lengths come back as lists (they cannot form one tensor)."""
    if isinstance(texts, str):
        texts = [texts]
    rows = [tokenizer.encode(text, add_special_tokens) for text in texts]
    if not rows:
        raise InputError("there are no texts to encode; pass at least one string")
    if not padding and len({len(row) for row in rows}) > 1:
        if return_tensors == "pt":
            raise InputError("rows of different lengths need padding=True to become one tensor")
        return {"input_ids": rows, "attention_mask": [[1] * len(row) for row in rows]}
    return pad_left(rows, tokenizer.pad_token_id, return_tensors == "pt")


def pad_left(rows: Sequence[Sequence[int]], pad_token_id: int, tensors: bool = True) -> dict:
    """Rows of ids left-padded to the longest; pad positions get attention_mask 0."""
    longest = max(len(row) for row in rows)
    input_ids = [[pad_token_id] * (longest - len(row)) + list(row) for row in rows]
    attention_mask = [[0] * (longest - len(row)) + [1] * len(row) for row in rows]
    if tensors:
        return {"input_ids": torch.tensor(input_ids, dtype=torch.long),
                "attention_mask": torch.tensor(attention_mask, dtype=torch.long)}
    return {"input_ids": input_ids, "attention_mask": attention_mask}
