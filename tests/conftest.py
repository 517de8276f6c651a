from pathlib import Path

import pytest

from chatglm2.random_checkpoint import write_demo_checkpoint
from helpers import TINY


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A 2-layer random ChatGLM2 checkpoint: two pytorch_model-*.bin shards plus index, as THUDM ships."""
    return write_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_bin", num_shards=2, **TINY)


@pytest.fixture(scope="session")
def tiny_ckpt_safetensors(tmp_path_factory) -> Path:
    return write_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_st", num_shards=3, safetensors=True, seed=1,
                                 **TINY)
