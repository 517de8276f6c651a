"""ChatGLM2-6B inference on an Ascend NPU, an NVIDIA GPU or a CPU: the library behind this project's commands.

One concern per module; the public model API is `chatglm2.causal_lm.ChatGLM2ForCausalLM` (re-exported by the seed's
`modeling_chatglm_ascend.py`) and `chatglm2.tokenizer.ChatGLM2Tokenizer`. Nothing is imported here, so importing one
module costs only what that module needs.
"""
