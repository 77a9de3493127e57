"""Byte-level tokenizer: ids 0-255 are raw bytes, then a few special tokens.

Torch-free, so the scheduler (prefix hashing, OpenAI API) and the engines share it. Nothing is ever
downloaded: the vocabulary is the 256 byte values plus the specials below. Chat messages are framed
with role markers so that a multi-turn conversation's token ids are a prefix of the next turn's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

BYTE_TOKENS = 256
BOS = 256
EOS = 257
PAD = 258
SYSTEM = 259
USER = 260
ASSISTANT = 261
END_OF_TURN = 262
VOCAB_SIZE = 263
"""Number of ids the tokenizer can emit; a model's vocabulary must be at least this large."""

SPECIAL_NAMES: dict[int, str] = {
    BOS: "<|bos|>",
    EOS: "<|eos|>",
    PAD: "<|pad|>",
    SYSTEM: "<|system|>",
    USER: "<|user|>",
    ASSISTANT: "<|assistant|>",
    END_OF_TURN: "<|end_of_turn|>",
}
_ROLE_MARKERS: dict[str, int] = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


class TokenizerError(ValueError):
    """A token id or chat role the tokenizer does not know."""


def encode(text: str, *, bos: bool = False) -> list[int]:
    """UTF-8 bytes of ``text`` as ids, optionally preceded by BOS."""
    ids = list(text.encode("utf-8"))
    return [BOS, *ids] if bos else ids


def decode(ids: Iterable[int], *, skip_special: bool = True) -> str:
    """Text for ``ids``; invalid UTF-8 (random weights emit arbitrary bytes) becomes U+FFFD.

    Special tokens are dropped when ``skip_special`` is true, else rendered by name.
    """
    out = bytearray()
    for token in ids:
        if 0 <= token < BYTE_TOKENS:
            out.append(token)
        elif token in SPECIAL_NAMES:
            if not skip_special:
                out.extend(SPECIAL_NAMES[token].encode("ascii"))
        else:
            raise TokenizerError(f"token id {token} is outside the vocabulary 0..{VOCAB_SIZE - 1}")
    return out.decode("utf-8", errors="replace")


def encode_chat(messages: Sequence[tuple[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
    """Frame ``(role, content)`` messages: ``BOS (<role> bytes <end_of_turn>)* [<assistant>]``.

    Each message's ids depend only on the messages before it, so turn n+1's prompt extends turn n's
    prompt plus its answer: exactly what lets the prefix index hit on multi-turn sessions.
    """
    ids = [BOS]
    for role, content in messages:
        marker = _ROLE_MARKERS.get(role)
        if marker is None:
            raise TokenizerError(f"unknown chat role {role!r}; expected one of {sorted(_ROLE_MARKERS)}")
        ids.append(marker)
        ids.extend(content.encode("utf-8"))
        ids.append(END_OF_TURN)
    if add_generation_prompt:
        ids.append(ASSISTANT)
    return ids


def validate_ids(ids: Iterable[int]) -> list[int]:
    """Return ``ids`` as a list, raising :class:`TokenizerError` naming the first id out of range."""
    checked = []
    for token in ids:
        if not 0 <= token < VOCAB_SIZE:
            raise TokenizerError(f"token id {token} is outside the vocabulary 0..{VOCAB_SIZE - 1}")
        checked.append(token)
    return checked
