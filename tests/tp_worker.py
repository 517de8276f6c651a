"""Run under torchrun by the tensor-parallel tests: each rank saves its logits, greedy and sampled tokens, and the
greedy tokens of a workload that preempts requests and hits cached prefixes in a small KV pool.

    tests/tp_worker.py MODEL_PATH TP_SIZE OUT_DIR ['{"quantize": "int4", ...}']   (extra from_pretrained arguments)
"""
import json
import sys
from pathlib import Path

import torch

from chatglm2 import collectives
from helpers import PROMPTS, pool_workload
from chatglm2.tokenizer import load_tokenizer
from modeling_chatglm_ascend import ChatGLM2ForCausalLM


def main(model_path: str, tp_size: int, out_dir: str, load_kwargs: dict) -> None:
    device = torch.device("cpu")
    tp_rank = collectives.init_tensor_parallel(tp_size, device)
    tokenizer = load_tokenizer(model_path)
    model = ChatGLM2ForCausalLM.from_pretrained(model_path, device=device, dtype=torch.float32, tp_rank=tp_rank,
                                                tp_size=tp_size, **load_kwargs)
    batch = tokenizer(PROMPTS)
    result = {"logits": model(**batch), "greedy": model.generate(**batch, max_new_tokens=12),
              "sampled": model.generate(**batch, max_new_tokens=12, do_sample=True, top_p=0.9, temperature=1.5)}
    result["pool"], result["preemptions"] = pool_workload(model, tokenizer)
    torch.save(result, Path(out_dir) / f"rank{tp_rank}.pt")
    collectives.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]) if len(sys.argv) > 4 else {})
