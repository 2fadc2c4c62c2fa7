"""What each member of a pool holds in its prefix cache, as far as the gateway knows.

Two kinds of knowledge, per member (``MemberCache``):

- **blocks**, from the member's own KV-cache events (``kv_events.py``): the blocks it stored and
  removed (and, bounded, which ones it removed). Each block is keyed by the gateway's own chained hash of its token ids (``token_chain``),
  not by vLLM's hash, so any hash algorithm or seed on the member works; a map from vLLM's hash to
  ours serves the removals, which carry only vLLM's. A stored block whose parent the gateway never
  saw cannot be chained and is skipped (``orphans``).
- **sent**, what the gateway sent it: an LRU set of prompt-chain keys (``prompt_chain.py``) sized
  to the member's cache (its ``num_gpu_blocks`` times ``block_size`` when its metrics say so, else
  ``pool_cache_tokens``), the approximate tree peers keep, used where events say nothing.

``Links`` ties the two: when a streamed response shows the prompt's token ids (``prompt_token_ids``,
which the gateway asks for anyway to fail over), each piece of the prompt's text is linked to the
last whole token block inside the same share of the prompt (``links_for``), so a later request
sharing that text can be looked up in a member's real blocks without tokenizing it.

A member's predicted hit (``MemberCache.hit_tokens``) is the longest prefix of the request's chain
it holds (binary search over the chain: a cache holds a prefix whole or loses its tail first), in
tokens.

Memory is bounded per member (``max_blocks`` entries; beyond it new blocks are not indexed and
``dropped`` counts them) and for the links (``links_kept``, LRU): about 200 bytes per entry.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from vllm_gateway.backends.pool.prompt_chain import CHUNK, PromptChain

__all__ = ["Links", "MemberCache", "token_chain"]

_TOKEN_ROOT = 0x70C5
DEFAULT_TOKENS_PER_BYTE = 0.25
# Pieces scanned for a prompt's first link: 4 KiB of text, more than one block of any size
# vLLM uses at any plausible tokens per byte.
FIRST_LINK_SCAN = 32


def token_chain(ids: Sequence[int], block_size: int, parent: int = _TOKEN_ROOT) -> list[int]:
    """The gateway's keys of the whole blocks of ``ids``, chained from ``parent``."""
    keys = []
    key = parent
    for start in range(0, len(ids) - block_size + 1, block_size):
        key = hash((key, tuple(ids[start : start + block_size])))
        keys.append(key)
    return keys


class MemberCache:
    """One member's cache as far as the gateway knows it (see the module docstring)."""

    __slots__ = (
        "block_size",
        "blocks",
        "by_vllm",
        "counts",
        "events_live",
        "gone",
        "last_seq",
        "max_blocks",
        "sent",
        "sent_capacity",
    )

    def __init__(self, max_blocks: int, sent_capacity: int) -> None:
        self.max_blocks = max_blocks
        self.sent_capacity = sent_capacity  # pieces of prompt text
        self.blocks: dict[int, int] = {}  # our block key -> copies the member holds
        self.by_vllm: dict[Any, list[Any]] = {}  # vLLM's hash -> [our key, copies]
        self.sent: OrderedDict[int, None] = OrderedDict()
        # Blocks it stored and then removed (bounded): a text key linked to one of them is known
        # not to be there, whatever was sent; a block never seen falls back to what was sent.
        self.gone: OrderedDict[int, None] = OrderedDict()
        self.block_size: int | None = None
        self.events_live = False  # connected to its event stream (or a message came)
        self.last_seq: int | None = None
        # events, orphans (blocks whose parent was never seen), dropped (over max_blocks),
        # gap / restart / bad (messages), resets (the index emptied).
        self.counts: Counter[str] = Counter()

    def note(self, what: str, n: int = 1) -> None:
        self.counts[what] += n

    # --- from its events -------------------------------------------------------------------

    def stored(
        self, hashes: Sequence[Any], parent: Any, token_ids: Sequence[int], block_size: int
    ) -> None:
        self.counts["events"] += 1
        self.block_size = block_size
        if parent is None:
            start = _TOKEN_ROOT
        else:
            known = self.by_vllm.get(parent)
            if known is None:
                self.counts["orphans"] += len(hashes)
                return
            start = known[0]
        keys = token_chain(token_ids, block_size, start)
        for vllm_hash, key in zip(hashes, keys, strict=False):
            entry = self.by_vllm.get(vllm_hash)
            if entry is not None:
                entry[1] += 1
                self.blocks[entry[0]] = self.blocks.get(entry[0], 0) + 1
                continue
            if len(self.by_vllm) >= self.max_blocks:
                self.counts["dropped"] += 1
                continue
            self.by_vllm[vllm_hash] = [key, 1]
            self.blocks[key] = self.blocks.get(key, 0) + 1
            self.gone.pop(key, None)

    def removed(self, hashes: Iterable[Any]) -> None:
        self.counts["events"] += 1
        for vllm_hash in hashes:
            entry = self.by_vllm.get(vllm_hash)
            if entry is None:
                continue
            entry[1] -= 1
            if entry[1] <= 0:
                del self.by_vllm[vllm_hash]
            count = self.blocks.get(entry[0], 0) - 1
            if count > 0:
                self.blocks[entry[0]] = count
            else:
                self.blocks.pop(entry[0], None)
                self.gone[entry[0]] = None
                if len(self.gone) > self.max_blocks:
                    self.gone.popitem(last=False)

    def clear(self) -> None:
        """Empty: the member restarted, reset its cache, or left the pool."""
        self.blocks.clear()
        self.by_vllm.clear()
        self.gone.clear()
        self.sent.clear()
        self.last_seq = None
        self.counts["resets"] += 1

    # --- from what it was sent ---------------------------------------------------------------

    def sent_chain(self, keys: Sequence[int]) -> None:
        sent = self.sent
        for key in keys:
            if key in sent:
                sent.move_to_end(key)
            else:
                sent[key] = None
        while len(sent) > self.sent_capacity:
            sent.popitem(last=False)

    # --- what it holds of a request ----------------------------------------------------------

    def hit_tokens(
        self,
        chain: PromptChain,
        links: Links | None,
        tokens_per_byte: float,
        first: tuple[int, tuple[int, int]] | None = None,
    ) -> int:
        """The tokens of ``chain``'s prompt this member is expected to serve from its cache.

        ``first`` is ``links.first(chain.keys)`` when the caller has it already."""
        keys = chain.keys
        use_blocks = self.events_live and links is not None and links.block_size == self.block_size
        link_of = links.get if use_blocks and links is not None else None
        blocks, gone, sent = self.blocks, self.gone, self.sent

        def present(key: int) -> bool:
            if link_of is not None:
                link = link_of(key)
                if link is not None:
                    if link[0] in blocks:
                        return True
                    if link[0] in gone:
                        return False
            return key in sent

        if not keys:
            return 0
        if present(keys[0]):
            lo = 1  # lo pieces are known present
        else:
            # The first pieces are shorter than a block, so only what was sent speaks for them;
            # the events speak from the first piece that covers a whole block.
            if link_of is not None and links is not None and first is None:
                first = links.first(keys)
            if link_of is None or first is None or first[1][0] not in blocks:
                return 0  # most members of a large pool: nothing of this prompt
            lo = first[0] + 1
        hi = len(keys)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if present(keys[mid - 1]):
                lo = mid
            else:
                hi = mid - 1
        if link_of is not None:
            link = link_of(keys[lo - 1])
            if link is not None and link[0] in blocks and self.block_size is not None:
                return link[1] * self.block_size
        return int(lo * CHUNK * tokens_per_byte)

    def size(self) -> int:
        return len(self.blocks) if self.events_live else len(self.sent)


class Links:
    """Prompt-chain key -> (our key of the last whole token block inside it, blocks), LRU."""

    __slots__ = ("_links", "block_size", "kept")

    def __init__(self, block_size: int, kept: int) -> None:
        self.block_size = block_size
        self.kept = kept
        self._links: OrderedDict[int, tuple[int, int]] = OrderedDict()

    def get(self, key: int) -> tuple[int, int] | None:
        return self._links.get(key)

    def __len__(self) -> int:
        return len(self._links)

    def first(self, keys: Sequence[int]) -> tuple[int, tuple[int, int]] | None:
        """(index, link) of the first of ``keys`` linked to a block: the first piece of a prompt
        is shorter than a block, so the first link comes a few pieces in (bounded scan)."""
        get = self._links.get
        for i, key in enumerate(keys[:FIRST_LINK_SCAN]):
            link = get(key)
            if link is not None:
                return i, link
        return None

    def learn(self, chain: PromptChain, prompt_ids: Sequence[int]) -> None:
        """Link each piece of ``chain`` to the token blocks of the same share of the prompt.

        A piece ending at byte ``e`` of ``size`` covers about ``e / size`` of the prompt's tokens;
        one token is held back, so a link never claims a block the text may not determine."""
        blocks = token_chain(prompt_ids, self.block_size)
        if not blocks or chain.size == 0:
            return
        n = len(prompt_ids)
        links = self._links
        for i, key in enumerate(chain.keys):
            covered = ((i + 1) * CHUNK * n) // chain.size - 1
            count = min(covered // self.block_size, len(blocks))
            if count < 1:
                continue
            links[key] = (blocks[count - 1], count)
            links.move_to_end(key)
        while len(links) > self.kept:
            links.popitem(last=False)
