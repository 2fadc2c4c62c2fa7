"""The simulator's toy tokenizer: reversible, and the one source of every prompt size."""

from __future__ import annotations

import pytest

from vllm_gateway_tools.simulator.tokenizer import (
    VOCAB_SIZE,
    Vocabulary,
    chat_messages,
    chat_tokens,
    count_text,
    prompt_tokens,
)


@pytest.mark.parametrize(
    "text", ["Hello world", "a", "abcd", "tabs\tand\nnewlines\r", "héllo wörld ✓", "", "x" * 41]
)
def test_encode_decode_round_trip(text: str) -> None:
    vocab = Vocabulary()
    tokens = vocab.encode(text)
    assert vocab.decode(tokens) == text
    assert len(tokens) == count_text(text)


def test_ascii_ids_are_the_same_in_every_process() -> None:
    assert Vocabulary().encode("Hello world") == Vocabulary().encode("Hello world")
    assert all(t < VOCAB_SIZE for t in Vocabulary().encode("any printable ASCII ~!"))


def test_unknown_ids_decode_to_nothing() -> None:
    vocab = Vocabulary()
    assert vocab.decode([VOCAB_SIZE, VOCAB_SIZE + 12345, 99999999]) == ""
    assert Vocabulary().decode(vocab.encode("ü")) == ""  # a table id from another process


def test_chat_tokens_are_three_per_message_plus_text() -> None:
    messages = chat_messages(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi there"}]},
        ]
    )
    assert messages == [("system", "be brief"), ("user", "hi there")]
    assert chat_tokens(messages) == (3 + 2) + (3 + 2)
    vocab = Vocabulary()
    tokens = vocab.encode_chat(messages)
    assert len(tokens) == chat_tokens(messages)
    assert (
        vocab.decode(tokens)
        == "<|im_start|>systembe brief<|im_end|><|im_start|>userhi there<|im_end|>"
    )


def test_prompt_tokens_agree_with_the_tokenizer() -> None:
    body = {
        "messages": [{"role": "user", "content": "x" * 41}, {"role": "assistant", "content": "ok"}]
    }
    assert prompt_tokens(body, True) == len(
        Vocabulary().encode_chat(chat_messages(body["messages"]))
    )
    assert prompt_tokens({"prompt": "y" * 9}, False) == len(Vocabulary().encode("y" * 9)) == 3
