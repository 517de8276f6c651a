"""The seed's environment variables, resolved into the explicit arguments the library takes. The only place that
reads them:

    MAX_SEQ_LEN           longest prompt + answer a sequence may have (default 2048)
    KV_CACHE_TOKENS       the servers' KV pool in tokens (as --kv_cache_tokens, which wins)
    ENABLE_QUANT          1: load the W8A8 weights in QUANT_WEIGHT_PATH
    ENABLE_SPARSE         1: load the sparse W8A8 weights compressed into COMPRESS_WEIGHT_PATH (implies W8A8)
    QUANT_WEIGHT_PATH     the folder export_quant_weight.py wrote
    COMPRESS_WEIGHT_PATH  the folder generate_compress_weight.py wrote
    TP_TIMEOUT_S          seconds any tensor-parallel collective may wait before the run ends (default 600)
    CEVAL_MAX_NEW_TOKENS  C-Eval stage-1 budget (default 512, the protocol's), for quick checks only

Every bad value is an InputError naming the variable.
"""
import os
from pathlib import Path

from chatglm2.errors import InputError

DEFAULT_MAX_SEQ_LEN = 2048
DEFAULT_TP_TIMEOUT_S = 600
DEFAULT_CEVAL_MAX_NEW_TOKENS = 512


def env_int(name: str, default: int, hint: str) -> int:
    """A positive integer variable; `hint` says what to set instead of a bad value."""
    value = os.environ.get(name, "").strip() or str(default)
    if not value.isdigit() or int(value) < 1:
        raise InputError(f"{name}={value!r} is not a positive integer; {hint}")
    return int(value)


def env_switch(name: str) -> bool:
    """An on/off variable: 1 on; 0, empty or unset off; anything else is refused."""
    flag = os.environ.get(name, "0").strip()
    if flag not in ("", "0", "1"):
        raise InputError(f"{name}={flag!r}: use 1 to turn it on, or 0 (or unset) to leave it off")
    return flag == "1"


def max_seq_len() -> int:
    return env_int("MAX_SEQ_LEN", DEFAULT_MAX_SEQ_LEN, "export e.g. MAX_SEQ_LEN=4096")


def kv_cache_tokens() -> int | None:
    """KV_CACHE_TOKENS, or None when unset."""
    if not os.environ.get("KV_CACHE_TOKENS", "").strip():
        return None
    return env_int("KV_CACHE_TOKENS", 1, "export e.g. KV_CACHE_TOKENS=65536, or unset it")


def tp_timeout_s() -> int:
    return env_int("TP_TIMEOUT_S", DEFAULT_TP_TIMEOUT_S, "export e.g. TP_TIMEOUT_S=600 (seconds)")


def ceval_max_new_tokens() -> int:
    return env_int("CEVAL_MAX_NEW_TOKENS", DEFAULT_CEVAL_MAX_NEW_TOKENS, "unset it for the protocol's 512")


def quant_path() -> Path | None:
    """QUANT_WEIGHT_PATH when ENABLE_QUANT=1 or ENABLE_SPARSE=1 (sparse quantization is W8A8 on pruned weights);
    None when both are off. Only the variables are checked here; the folder's content is checked where it is read."""
    switch = "ENABLE_SPARSE" if env_switch("ENABLE_SPARSE") else "ENABLE_QUANT" if env_switch("ENABLE_QUANT") else None
    if switch is None:
        return None
    if not os.environ.get("QUANT_WEIGHT_PATH"):
        raise InputError(f"{switch}=1 needs QUANT_WEIGHT_PATH, the folder export_quant_weight.py wrote; "
                         f"export QUANT_WEIGHT_PATH=... (or unset {switch} for float)")
    return Path(os.environ["QUANT_WEIGHT_PATH"])


def compress_path() -> Path | None:
    """COMPRESS_WEIGHT_PATH when ENABLE_SPARSE=1, else None."""
    if not env_switch("ENABLE_SPARSE"):
        return None
    if not os.environ.get("COMPRESS_WEIGHT_PATH"):
        raise InputError("ENABLE_SPARSE=1 needs COMPRESS_WEIGHT_PATH, the folder generate_compress_weight.py wrote; "
                         "export COMPRESS_WEIGHT_PATH=... (or unset ENABLE_SPARSE)")
    return Path(os.environ["COMPRESS_WEIGHT_PATH"])
