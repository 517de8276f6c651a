"""The seed's modeling file: ChatGLM2-6B for an Ascend NPU, an NVIDIA GPU or a CPU.

    from modeling_chatglm_ascend import ChatGLM2ForCausalLM, ChatGLM2Tokenizer

The implementation lives in the `chatglm2` package; this file names the public API where the seed's scripts (and
`main.py --model_file`) expect it. A custom --model_file only needs to define ChatGLM2ForCausalLM.
"""
from chatglm2.config import ChatGLM2Config
from chatglm2.model import ChatGLM2ForCausalLM
from chatglm2.tokenizer import ChatGLM2Tokenizer

__all__ = ["ChatGLM2Config", "ChatGLM2ForCausalLM", "ChatGLM2Tokenizer"]
