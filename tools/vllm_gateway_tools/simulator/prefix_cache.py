"""The simulator's model of vLLM's prefix cache (v1 automatic prefix caching), and its KV events.

Off unless ``SimulatorConfig.prefix_cache_blocks`` > 0. Only chat and completions requests use it.

The model:

- A prompt's token ids (the toy tokenizer's, the same ids a request gets back as
  ``prompt_token_ids``) are cut into full blocks of ``block_size`` tokens; a partial last block is
  never cached.
- Block ``i`` has the hash ``h_i = blake2b-64(h_{i-1} or SEED, block i's tokens)`` as an unsigned
  64-bit int: a chain, so equal hashes mean equal prefixes, and the same in every process (never
  Python's ``hash()``).
- A request's hit is the number of leading blocks found in the cache times ``block_size`` tokens.
  As vLLM, at least one prompt token is always computed: only the first ``(n - 1) // block_size``
  blocks of an ``n``-token prompt are looked up (a fully cached 64-token prompt with blocks of 16
  hits 48 tokens).
- Then all its full blocks are in the cache: the hits are touched, the new ones inserted, both as
  most recently used, block 0 most recent of all (vLLM frees a request's blocks tail first, so a
  sequence's tail is evicted before its head). Beyond ``capacity`` blocks the least recently used
  go. This happens when the request is admitted, as vLLM caches a block once it is scheduled, so a
  request arriving during another's prefill already hits its blocks. A prompt longer than the
  whole cache keeps only its first ``capacity`` blocks.
- Unlike vLLM, no block is pinned by a running request: a running request's blocks may be evicted
  (the model has no memory of its own to protect). LoRA adapters, multimodal inputs and cache salts
  do not enter the hash. ``queries`` and ``hits`` count tokens, as ``vllm:prefix_cache_queries``
  and ``vllm:prefix_cache_hits`` do.

Events, in the shapes vLLM 0.32's ``BlockStored``, ``BlockRemoved`` and ``AllBlocksCleared`` encode
to: a request publishes only what changed, ``BlockRemoved`` (one per evicted block) first, then one
``BlockStored`` per run of consecutive new blocks, whose ``parent_block_hash`` is the hash of the
block before the run (None for a run that starts at block 0). Memory is bounded: the cache holds at
most ``capacity`` hashes and nothing else.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from vllm_gateway_tools.simulator.tokenizer import Vocabulary, chat_messages

__all__ = ["MEDIUM", "SEED", "PrefixCache", "block_hashes", "prompt_sequences"]

MEDIUM = "GPU"
# The parent of block 0: a fixed 64-bit value, the same in every process.
SEED = int.from_bytes(
    hashlib.blake2b(b"vllm-gateway simulator prefix cache", digest_size=8).digest(), "big"
)


def _pack(block: Sequence[int]) -> bytes:
    try:
        return struct.pack(f">{len(block)}q", *block)
    except struct.error:  # an id beyond 64 bits (a completions prompt of raw ids): any stable form
        return repr(list(block)).encode()


def block_hashes(tokens: Sequence[int], block_size: int) -> list[int]:
    """The hash chain of the full blocks of ``tokens``: unsigned 64-bit ints."""
    out: list[int] = []
    parent = SEED
    for start in range(0, len(tokens) - block_size + 1, block_size):
        digest = hashlib.blake2b(
            parent.to_bytes(8, "big") + _pack(tokens[start : start + block_size]), digest_size=8
        ).digest()
        parent = int.from_bytes(digest, "big")
        out.append(parent)
    return out


def prompt_sequences(vocab: Vocabulary, body: dict[str, Any], chat: bool) -> list[list[int]]:
    """The token ids of each prompt of a chat or completions body (several for a completions
    ``prompt`` list, each its own engine request in vLLM); ``[]`` when there is none."""
    if chat:
        messages = body.get("messages")
        return [vocab.encode_chat(chat_messages(messages))] if isinstance(messages, list) else []
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [vocab.encode(prompt)]
    if not isinstance(prompt, list) or not prompt:
        return []
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    out: list[list[int]] = []
    for item in prompt:
        if isinstance(item, str):
            out.append(vocab.encode(item))
        elif isinstance(item, list) and all(isinstance(t, int) for t in item):
            out.append(list(item))
    return out


class PrefixCache:
    """An LRU set of at most ``capacity`` block hashes, with token counters."""

    def __init__(self, capacity: int, block_size: int) -> None:
        if capacity < 1 or block_size < 1:
            raise ValueError("a prefix cache needs capacity >= 1 and block_size >= 1")
        self.capacity = capacity
        self.block_size = block_size
        self._blocks: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # of which found cached

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._blocks

    @property
    def usage(self) -> float:
        """Cached blocks / capacity, 0..1."""
        return len(self._blocks) / self.capacity

    def admit(self, tokens: Sequence[int], *, events: bool = False) -> tuple[int, list[Any]]:
        """Look ``tokens`` up, then cache its full blocks. Returns (hit tokens, the events this
        changed, in order; empty unless ``events``)."""
        size = self.block_size
        n = len(tokens)
        self.queries += n
        hashes = block_hashes(tokens, size)
        lookup = min(len(hashes), (n - 1) // size) if n else 0
        blocks = self._blocks
        hit_blocks = 0
        while hit_blocks < lookup and hashes[hit_blocks] in blocks:
            hit_blocks += 1
        hit = hit_blocks * size
        self.hits += hit
        keep = hashes[: self.capacity]
        new = [i for i, h in enumerate(keep) if h not in blocks]
        for h in reversed(keep):  # block 0 ends most recently used: the tail is evicted first
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        evicted = [blocks.popitem(last=False)[0] for _ in range(len(blocks) - self.capacity)]
        if not events:
            return hit, []
        out: list[Any] = [
            {"type": "BlockRemoved", "block_hashes": [h], "medium": MEDIUM} for h in evicted
        ]
        for start, end in _runs(new):
            out.append(
                {
                    "type": "BlockStored",
                    "block_hashes": keep[start:end],
                    "parent_block_hash": keep[start - 1] if start else None,
                    "token_ids": list(tokens[start * size : end * size]),
                    "block_size": size,
                    "lora_id": None,
                    "medium": MEDIUM,
                    "lora_name": None,
                }
            )
        return hit, out

    def clear(self) -> list[Any]:
        """Forget every block (the counters stay); the event that says so."""
        self._blocks.clear()
        return [{"type": "AllBlocksCleared"}]

    def reset_counters(self) -> None:
        self.queries = self.hits = 0


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted ``indices`` as [start, end) pairs."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs
