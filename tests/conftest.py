import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo_checkpoint import write_demo_checkpoint  # noqa: E402

# Enough heads and KV groups for tensor parallel 2 and 4; small enough for CI's 2 cores.
TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=8, kv_channels=16,
            multi_query_group_num=2)
PROMPTS = ["你好", "今天天气怎么样？请问明天会下雨吗", "Write a short poem about the sea.", "1+1=?"]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A 2-layer random ChatGLM2 checkpoint: two pytorch_model-*.bin shards plus index, as THUDM ships."""
    return write_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_bin", num_shards=2, **TINY)


@pytest.fixture(scope="session")
def tiny_ckpt_safetensors(tmp_path_factory) -> Path:
    return write_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_st", num_shards=3, safetensors=True, seed=1,
                                 **TINY)


def run_env(**extra: str) -> dict:
    """Environment for subprocesses of the commands under test."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env.pop("MAX_SEQ_LEN", None) if "MAX_SEQ_LEN" not in extra else None
    return env
