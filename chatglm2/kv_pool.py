"""The bookkeeping of the paged KV cache: which blocks of the pool are free, in use, or cached for reuse.

The cache is a pool of blocks of BLOCK_SIZE tokens (the tensors live on the model; see model.allocate_kv_cache). A
request holds a block table, the blocks of its positions in order. A full block is keyed by a hash of its tokens and
of every token before it, so two sequences that share a prefix share its full blocks (reference counts); when no
request holds a hashed block any more it stays cached, evicted least recently used first when a block is needed.
Block 0 is never handed out: padding rows and padding tokens write there, and unused table entries point there.

Only rank 0 keeps this under tensor parallel; the other ranks get the block tables in the engine's plan.
"""
import hashlib
from array import array
from collections import OrderedDict
from typing import Sequence

import torch

# 16 tokens, vLLM's default: a prefix is reused up to its last full block, so a small block wastes at most 15 tokens
# of recompute per hit and of memory per sequence; gathering the blocks of a step costs the same at any size.
BLOCK_SIZE = 16
NULL_BLOCK = 0


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_SIZE)


def full_length_tokens(sequences: int, max_seq_len: int) -> int:
    """A pool in which `sequences` sequences of MAX_SEQ_LEN tokens all fit at once (whole blocks each)."""
    return sequences * blocks_for(max_seq_len) * BLOCK_SIZE


def block_hashes(token_ids: Sequence[int], previous: Sequence[bytes] = ()) -> list[bytes]:
    """The chained hash of each full block of token_ids, continuing `previous` (the hashes of its first blocks)."""
    hashes = list(previous)
    for start in range(len(hashes) * BLOCK_SIZE, len(token_ids) - BLOCK_SIZE + 1, BLOCK_SIZE):
        parent = hashes[-1] if hashes else b""
        hashes.append(hashlib.sha256(parent + array("q", token_ids[start:start + BLOCK_SIZE]).tobytes()).digest())
    return hashes


class BlockPool:
    def __init__(self, num_blocks: int):
        """num_blocks includes the null block."""
        self.num_blocks = num_blocks
        self.free: list[int] = list(range(num_blocks - 1, NULL_BLOCK, -1))
        self.refs = [0] * num_blocks
        self.hash_of: dict[int, bytes] = {}
        self.block_of: dict[bytes, int] = {}
        self.cached: OrderedDict[int, None] = OrderedDict()  # hashed blocks no request holds, oldest first
        self.queried_tokens = 0
        self.hit_tokens = 0

    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks - 1) * BLOCK_SIZE

    def available(self) -> int:
        """Blocks that can be taken now: free, or cached and evictable."""
        return len(self.free) + len(self.cached)

    def take(self, count: int) -> list[int]:
        """`count` blocks for a request; the caller checked available()."""
        blocks = []
        for _ in range(count):
            if self.free:
                block = self.free.pop()
            else:
                block, _ = self.cached.popitem(last=False)
                del self.block_of[self.hash_of.pop(block)]
            self.refs[block] = 1
            blocks.append(block)
        return blocks

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes`, now held by the caller."""
        blocks = []
        for block_hash in hashes:
            block = self.block_of.get(block_hash)
            if block is None:
                break
            if self.refs[block] == 0:
                del self.cached[block]
            self.refs[block] += 1
            blocks.append(block)
        return blocks

    def count_lookup(self, tokens: int, hit_tokens: int) -> None:
        """For the hit rate: a prompt of `tokens` tokens found hit_tokens of them cached."""
        self.queried_tokens += tokens
        self.hit_tokens += hit_tokens

    def register(self, block: int, block_hash: bytes) -> None:
        """Offer a block just filled for reuse; a block of the same content already cached keeps the key."""
        if block_hash not in self.block_of and block not in self.hash_of:
            self.block_of[block_hash] = block
            self.hash_of[block] = block_hash

    def release(self, blocks: Sequence[int]) -> None:
        """Give back a block table's blocks, last first: of a sequence's cached blocks, the tail is evicted first, so
        a shared prefix outlives what follows it (a chain is only found from its first block on)."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.hash_of:
                    self.cached[block] = None
                else:
                    self.free.append(block)

    def forget(self) -> None:
        """Drop every cached block (after a failed forward pass, whose blocks may hold anything)."""
        self.free.extend(self.cached)
        self.cached.clear()
        self.hash_of.clear()
        self.block_of.clear()

    def stats(self) -> dict:
        used = self.num_blocks - 1 - len(self.free) - len(self.cached)
        return {"block_size": BLOCK_SIZE, "blocks": self.num_blocks - 1, "blocks_used": used,
                "blocks_cached": len(self.cached), "blocks_free": len(self.free),
                "queried_tokens": self.queried_tokens, "hit_tokens": self.hit_tokens,
                "prefix_hit_rate": self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0}


def padded_block_tables(block_tables: Sequence[Sequence[int]], width: int, device: torch.device) -> torch.Tensor:
    """The block tables as one tensor [rows, width or more], filled out with the null block."""
    width = max(width, *(len(table) for table in block_tables))
    return torch.tensor([list(table) + [NULL_BLOCK] * (width - len(table)) for table in block_tables], device=device)
