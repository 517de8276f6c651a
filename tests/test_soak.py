"""Issue 23: a server's resident memory stays bounded however the prompt lengths vary (benchmarks/soak.py, short)."""
import pytest

from benchmarks.soak import requests_of, soak
from helpers import free_port

pytestmark = pytest.mark.slow  # a server process answering about a thousand requests


def test_server_memory_stays_bounded_under_a_soak_of_varied_requests(tiny_ckpt, tmp_path):
    requests = requests_of(seed=0, count=960, prompt_max=400)
    run = soak(str(tiny_ckpt), requests, block=240, clients=16, port=free_port(), log=tmp_path / "server.log",
               progress=lambda line: None)
    refused = sum(r["kind"] == "refused" for r in requests)
    assert run["outcomes"] == {"ok": len(requests) - refused, "refused": refused}, run["outcomes"]
    assert run["probe_unchanged"]
    # before prefill passes of fixed sizes: 1.48x after 960 requests on a small checkpoint, rising
    assert run["rss_mb"][-1] <= 1.15 * run["rss_mb"][0], run["rss_mb"]
