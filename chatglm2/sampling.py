"""Choosing the next token from logits: the reference's NaN/Inf guard, greedy, and temperature/top-k/top-p sampling."""
import torch

# THUDM's InvalidScoreLogitsProcessor: a row with any NaN/Inf becomes zeros with 5e4 on token 5.
GUARD_TOKEN_ID, GUARD_SCORE = 5, 5e4


def guard_invalid_scores(logits: torch.Tensor) -> torch.Tensor:
    invalid_row = ~torch.isfinite(logits).all(dim=-1, keepdim=True)
    guarded = torch.zeros_like(logits)
    guarded[:, GUARD_TOKEN_ID] = GUARD_SCORE
    return torch.where(invalid_row, guarded, logits)


def next_token(logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [batch, vocab] (fp32) -> token ids [batch]; the filters follow transformers' logits warpers."""
    logits = guard_invalid_scores(logits)
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / max(temperature, 1e-5)
    if top_k > 0:
        kth_best = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= 1 - top_p
        remove[:, -1] = False
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
