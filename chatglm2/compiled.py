"""The decode step compiled by inductor and, on CUDA, captured in CUDA graphs: one launch per token.

The step (ChatGLM2ForCausalLM.decode_step) has static shapes: the rows of a bucket (1, 2, 4, ... up to the KV
cache's slots), the whole MAX_SEQ_LEN of keys, and the positions in a tensor from which the mask is built on the
device, so requests joining and leaving change data, not shapes. Inputs are copied into static buffers; on CUDA
each bucket's graph is captured once, when the cache is allocated (so compilation and capture count as load time),
and replayed per token; tensor parallel's NCCL all-reduces are captured inside it. On a CPU there are no graphs:
the compiled step (inductor's C++ backend) runs as it is.
"""
import torch

COMPILE_MODES = ("auto", "on", "off")


def compile_enabled(mode: str, device: torch.device) -> bool:
    """auto = on for CUDA, where launch overhead dominates a decode step; off elsewhere."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def buckets(slots: int) -> list[int]:
    """Row counts the step is compiled for: powers of two below `slots`, and `slots` itself."""
    sizes, size = [], 1
    while size < slots:
        sizes.append(size)
        size *= 2
    return sizes + [slots]


class CompiledDecode:
    def __init__(self, model, slots: int):
        self.model, self.key_len = model, model.max_seq_len
        self.buckets = buckets(slots)
        device = model.device
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        # Static shapes for the first bucket; a second one recompiles once with the row count symbolic. Dynamo keeps
        # one cache per function for every model instance, so a process holding several compiled models needs more
        # entries than its default 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.step = torch.compile(model.decode_step, fullgraph=True)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            if device.type == "cuda":
                self._capture(device)
            else:
                for rows in self.buckets:  # compile every bucket now rather than in the middle of serving
                    self.run(rows)

    def run(self, rows: int) -> torch.Tensor:
        return self.step(self.tokens[:rows], self.positions[:rows], self.key_len, True)

    def _capture(self, device: torch.device) -> None:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # compile and warm up off the capture, as CUDA graphs require
            for rows in self.buckets:
                for _ in range(3):
                    self.run(rows)
        torch.cuda.current_stream(device).wait_stream(side)
        pool = None
        for rows in reversed(self.buckets):  # largest first, so the smaller graphs fit in its memory pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[rows] = self.run(rows)
            pool = graph.pool()
            self.graphs[rows] = graph

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [len(tokens), vocab] of one decode step for the first len(tokens) cache rows."""
        count = tokens.shape[0]
        rows = next(size for size in self.buckets if size >= count)
        self.tokens[:count].copy_(tokens)
        self.positions[:count].copy_(positions)
        self.tokens[count:rows].zero_()  # padding rows: token 0 at position 0 of their own (idle) cache rows
        self.positions[count:rows].zero_()
        if rows in self.graphs:
            self.graphs[rows].replay()
            return self.outputs[rows][:count]
        return self.run(rows)[:count]
