"""The decode step compiled by inductor and, on CUDA, captured in CUDA graphs: one launch per token.

The step (ChatGLM2ForCausalLM.decode_step) has static shapes: the rows of a bucket (1, 2, 4, ... up to the engine's
max_batch), the keys of a bucket (128, 256, ... up to MAX_SEQ_LEN: the smallest that holds every row's position,
so a step's attention reads the live context, not the whole pool), and the positions and block tables in tensors
from which the pool slots and the mask are built on the device, so requests joining and leaving change data, not
shapes. Inputs are copied into static buffers; on CUDA each (rows, keys) bucket's graph is captured once, when the
cache is allocated (so compilation and capture count as load time), and replayed per token; tensor parallel's NCCL
all-reduces are captured inside it. On a CPU there are no graphs: the compiled step (inductor's C++ backend) runs as
it is.
"""
import torch

from chatglm2.kv_pool import BLOCK_SIZE, NULL_BLOCK, blocks_for

COMPILE_MODES = ("auto", "on", "off")
# The smallest key bucket: below it attention is a sliver of a step, and fewer buckets are fewer graphs to capture.
MIN_KEY_BUCKET = 128


def compile_enabled(mode: str, device: torch.device) -> bool:
    """auto = on for CUDA, where launch overhead dominates a decode step; off elsewhere."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def buckets(limit: int, smallest: int = 1) -> list[int]:
    """Sizes the step is compiled for: powers of two from `smallest` below `limit`, and `limit` itself."""
    sizes, size = [], smallest
    while size < limit:
        sizes.append(size)
        size *= 2
    return sizes + [limit]


def bucket(sizes: list[int], needed: int) -> int:
    return next(size for size in sizes if size >= needed)


class CompiledDecode:
    def __init__(self, model, max_rows: int):
        self.model, self.max_rows = model, max_rows
        self.row_buckets = buckets(max_rows)
        self.key_buckets = buckets(blocks_for(model.max_seq_len) * BLOCK_SIZE, MIN_KEY_BUCKET)
        device = model.device
        self.tokens = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.block_tables = torch.full((max_rows, self.key_buckets[-1] // BLOCK_SIZE), NULL_BLOCK, device=device)
        # Static shapes for the first bucket; a second size of rows or keys recompiles once with that size symbolic.
        # Dynamo keeps one cache per function for every model instance, so a process holding several compiled models
        # needs more entries than its default 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.step = torch.compile(model.decode_step, fullgraph=True)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        pairs = [(rows, keys) for rows in self.row_buckets for keys in self.key_buckets]
        with torch.inference_mode():
            if device.type == "cuda":
                self._capture(device, pairs)
            else:
                for rows, keys in pairs:  # compile every bucket now rather than in the middle of serving
                    self.run(rows, keys)

    def run(self, rows: int, keys: int) -> torch.Tensor:
        return self.step(self.tokens[:rows], self.positions[:rows], self.block_tables[:rows, :keys // BLOCK_SIZE], keys,
                         True)

    def _capture(self, device: torch.device, pairs: list[tuple[int, int]]) -> None:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # compile and warm up off the capture, as CUDA graphs require
            for rows, keys in pairs:
                for _ in range(3):
                    self.run(rows, keys)
        torch.cuda.current_stream(device).wait_stream(side)
        pool = None
        for pair in reversed(pairs):  # largest first, so the smaller graphs fit in its memory pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[pair] = self.run(*pair)
            pool = graph.pool()
            self.graphs[pair] = graph

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor,
                 key_len: int) -> torch.Tensor:
        """Logits [len(tokens), vocab] of one decode step of len(tokens) rows, whose positions are all below key_len
        and whose blocks are in block_tables [rows, blocks_for(key_len) or more]."""
        count = tokens.shape[0]
        pair = bucket(self.row_buckets, count), bucket(self.key_buckets, key_len)
        rows, width = pair[0], min(block_tables.shape[1], pair[1] // BLOCK_SIZE)
        self.tokens[:count].copy_(tokens)
        self.positions[:count].copy_(positions)
        self.block_tables[:count, :width].copy_(block_tables[:, :width])
        self.block_tables[:count, width:].fill_(NULL_BLOCK)
        # padding rows: token 0 at position 0 of the null block
        self.tokens[count:rows].zero_()
        self.positions[count:rows].zero_()
        self.block_tables[count:rows].fill_(NULL_BLOCK)
        if pair in self.graphs:
            self.graphs[pair].replay()
            return self.outputs[pair][:count]
        return self.run(*pair)[:count]
