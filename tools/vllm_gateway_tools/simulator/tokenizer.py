"""The simulator's toy tokenizer: one token per four characters, reversible, no vocabulary file.

Every prompt size the simulator reports (``usage``, ``/tokenize``, ``count_tokens``, the context
length check) comes from here, so the numbers agree across routes:

- a text is cut into pieces of ``PIECE`` characters; each piece is one token;
- a conversation renders each message as ``<|im_start|>``, the role, the content's pieces and
  ``<|im_end|>``: three tokens per message on top of its text (a toy chat template).

Token ids: ``<|im_start|>`` is 1, ``<|im_end|>`` 2, the roles 3..7. A piece of plain ASCII
(printable, tab, newline, carriage return) is packed into its id (``ASCII_BASE`` plus the piece as
a base-99 number), so any process decodes it; other pieces get ids from a bounded table of this
process (``Vocabulary``). Ids from ``VOCAB_SIZE`` up, and table ids never handed out, decode to
``""``, as vLLM decodes an out-of-vocabulary id.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

__all__ = [
    "ASCII_BASE",
    "CHOICE_STRIDE",
    "OUTPUT_BASE",
    "PIECE",
    "VOCAB_SIZE",
    "Vocabulary",
    "chat_messages",
    "chat_tokens",
    "content_text",
    "count_text",
    "output_id",
    "output_lineage",
    "output_piece",
    "prompt_tokens",
]

PIECE = 4
ASCII_BASE = 1000
_SYMBOLS = "\t\n\r" + "".join(chr(c) for c in range(32, 127))
_CODE = {c: i + 1 for i, c in enumerate(_SYMBOLS)}  # 0 pads a short last piece
_RADIX = len(_SYMBOLS) + 1
_TABLE_BASE: int = ASCII_BASE + _RADIX**PIECE
_TABLE_MAX = 65536
# Output token k of choice c (the text `` tok{k}``, `` c{c}tok{k}`` for c > 0: the choices of an
# ``n`` > 1 request, sampled, differ, so a mix-up shows) has id OUTPUT_BASE + c * CHOICE_STRIDE + k: a
# continuation whose prompt ends in output ids goes on from the next one of the same choice, as a
# model continues its own answer.
OUTPUT_BASE = _TABLE_BASE + _TABLE_MAX
CHOICE_STRIDE = 1 << 16
_OUTPUT_MAX = 1 << 20
VOCAB_SIZE = OUTPUT_BASE + _OUTPUT_MAX
_OUTPUT_PIECE = re.compile(r" (?:c(\d+))?tok(\d+)")
IM_START, IM_END = 1, 2
ROLES = {"system": 3, "user": 4, "assistant": 5, "tool": 6, "developer": 7}
_SPECIAL = {IM_START: "<|im_start|>", IM_END: "<|im_end|>"} | {v: k for k, v in ROLES.items()}


def count_text(text: str) -> int:
    """How many tokens ``text`` is: one per ``PIECE`` characters, rounded up."""
    return (len(text) + PIECE - 1) // PIECE


def content_text(content: Any) -> str:
    """The text of a message's content: a string, or the ``text`` of each part of a list
    (chat ``text``, Responses ``input_text``/``output_text``, Anthropic ``text`` blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def chat_messages(messages: Iterable[Any]) -> list[tuple[str, str]]:
    """(role, text) for each message of a chat-like list; non-dict entries count as empty."""
    out = []
    for m in messages:
        if isinstance(m, dict):
            role = m["role"] if isinstance(m.get("role"), str) else "user"
            text = content_text(m.get("content"))
            if not text and isinstance(m.get("output"), str):  # a Responses tool output item
                text = m["output"]
            out.append((role, text))
        else:
            out.append(("user", ""))
    return out


def chat_tokens(messages: Iterable[tuple[str, str]]) -> int:
    """The size of a rendered conversation: three tokens per message plus its text."""
    return sum(3 + count_text(text) for _, text in messages)


def output_id(index: int, choice: int = 0) -> int:
    """The id of output token ``index`` of choice ``choice``."""
    return OUTPUT_BASE + choice * CHOICE_STRIDE + index


def output_piece(index: int, choice: int = 0) -> str:
    """The text of output token ``index`` of choice ``choice``."""
    return f" tok{index}" if choice == 0 else f" c{choice}tok{index}"


def output_start(prompt: Any) -> int:
    """The index of the first output token for a prompt of token ids: after the last output id
    the prompt ends with (a continuation), else 0."""
    last = prompt[-1] if isinstance(prompt, list) and prompt else None
    if isinstance(last, int) and OUTPUT_BASE <= last < VOCAB_SIZE:
        return (last - OUTPUT_BASE) % CHOICE_STRIDE + 1
    return 0


def output_lineage(prompt: Any) -> int | None:
    """The choice a prompt of token ids continues (its last id is that choice's output), or
    None for a fresh prompt."""
    last = prompt[-1] if isinstance(prompt, list) and prompt else None
    if isinstance(last, int) and OUTPUT_BASE <= last < VOCAB_SIZE:
        return (last - OUTPUT_BASE) // CHOICE_STRIDE
    return None


def prompt_tokens(body: dict[str, Any], chat: bool) -> int | None:
    """The prompt size of a chat or completions request body. None when the prompt is missing."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        return max(1, chat_tokens(chat_messages(messages)))
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return max(1, count_text(prompt))
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) for t in prompt):
            return len(prompt)
        if all(isinstance(p, list) for p in prompt):  # several prompts of token ids
            return max(1, sum(len(p) for p in prompt))
        return max(1, sum(count_text(p) for p in prompt if isinstance(p, str)))
    return None


class Vocabulary:
    """Encode and decode with the toy tokenizer. One per simulator: it holds the table of the
    non-ASCII pieces it has handed out (at most ``_TABLE_MAX``; later ones get id 0)."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._pieces: dict[int, str] = {}

    def encode(self, text: str) -> list[int]:
        return [self._piece_id(text[i : i + PIECE]) for i in range(0, len(text), PIECE)]

    def encode_output(self, text: str) -> list[int]:
        """``text`` with the model's own output pieces (`` tok3``, `` c1tok3``) read back as their
        output ids, as a tokenizer reads back what it wrote; other text as ``encode``."""
        out: list[int] = []
        at = 0
        for match in _OUTPUT_PIECE.finditer(text):
            out += self.encode(text[at : match.start()])
            out.append(output_id(int(match.group(2)), int(match.group(1) or 0)))
            at = match.end()
        return out + self.encode(text[at:])

    def encode_chat(self, messages: Iterable[tuple[str, str]]) -> list[int]:
        out: list[int] = []
        for role, text in messages:
            out.append(IM_START)
            out.append(ROLES.get(role, ROLES["user"]))
            out.extend(self.encode(text))
            out.append(IM_END)
        return out

    def piece(self, token: int) -> str:
        """The text of one token id; ``""`` for an id this tokenizer never handed out."""
        special = _SPECIAL.get(token)
        if special is not None:
            return special
        if OUTPUT_BASE <= token < VOCAB_SIZE:
            choice, index = divmod(token - OUTPUT_BASE, CHOICE_STRIDE)
            return output_piece(index, choice)
        if ASCII_BASE <= token < _TABLE_BASE:
            value = token - ASCII_BASE
            codes = []
            for _ in range(PIECE):
                value, code = divmod(value, _RADIX)
                codes.append(code)
            codes.reverse()
            text = "".join(_SYMBOLS[c - 1] for c in codes if c)
            # Padding only ends a piece: any other id is not one this tokenizer makes.
            return text if all(codes[: len(text)]) else ""
        return self._pieces.get(token, "")

    def decode(self, tokens: Iterable[int]) -> str:
        return "".join(self.piece(t) for t in tokens)

    def _piece_id(self, piece: str) -> int:
        if all(c in _CODE for c in piece):
            value = 0
            for i in range(PIECE):
                value = value * _RADIX + (_CODE[piece[i]] if i < len(piece) else 0)
            return ASCII_BASE + value
        known = self._ids.get(piece)
        if known is not None:
            return known
        if len(self._ids) >= _TABLE_MAX:
            return 0
        token = _TABLE_BASE + len(self._ids)
        self._ids[piece] = token
        self._pieces[token] = piece
        return token
