"""Run under torchrun by test_tensor_parallel.py: each rank saves its logits, greedy and sampled tokens."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import distributed  # noqa: E402
from conftest import PROMPTS  # noqa: E402
from modeling_chatglm_ascend import ChatGLM2ForCausalLM, ChatGLM2Tokenizer  # noqa: E402


def main(model_path: str, tp_size: int, out_dir: str) -> None:
    device = torch.device("cpu")
    tp_rank = distributed.init_tensor_parallel(tp_size, device)
    tokenizer = ChatGLM2Tokenizer.from_pretrained(model_path)
    model = ChatGLM2ForCausalLM.from_pretrained(model_path, device=device, dtype=torch.float32, tp_rank=tp_rank,
                                                tp_size=tp_size)
    batch = tokenizer(PROMPTS)
    result = {"logits": model(**batch), "greedy": model.generate(**batch, max_new_tokens=12),
              "sampled": model.generate(**batch, max_new_tokens=12, do_sample=True, top_p=0.9, temperature=1.5)}
    torch.save(result, Path(out_dir) / f"rank{tp_rank}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
