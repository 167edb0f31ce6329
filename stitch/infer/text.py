"""Incremental detokenisation and stop strings, per request.

Decoding the whole output at every step is quadratic; decoding one token at a time breaks multi-byte
characters and SentencePiece's leading spaces. So, as vLLM does, each step decodes a short window twice: the
tokens already turned into text (`prefix_offset:read_offset`) and the same window plus the new ones; the
difference is the new text. A window ending inside a UTF-8 character (decodes to U+FFFD) waits for more tokens.

Stop strings are searched in the text (they may span tokens); the text is cut where the first one begins. A
streamed piece never ends inside a possible stop string: the longest tail of the text that could still grow
into one is held back until it either does (and is cut) or cannot.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["TextStream"]


class TextStream:
    """The text of one request's generated tokens, grown a token at a time; `take()` returns unseen text."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._prefix_offset = 0
        self._read_offset = 0
        self._emitted = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, final: bool) -> None:
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.ids[self._prefix_offset :])
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self._append(full[len(prefix) :])
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)

    def _append(self, piece: str) -> None:
        start = max(0, len(self.text) - self._max_stop + 1)
        self.text += piece
        if not self.stop:
            return
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def add(self, token_id: int) -> bool:
        """Append one token; True when a stop string has now appeared (the text is cut before it)."""
        if self.stopped:
            return True
        self.ids.append(int(token_id))
        self._advance(final=False)
        return self.stopped

    def finish(self) -> None:
        """No more tokens: decode whatever was held back waiting for the rest of a character."""
        if not self.stopped and self._read_offset < len(self.ids):
            self._advance(final=True)

    def _holdback(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        for k in range(min(len(self.text), self._max_stop - 1), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def take(self, final: bool = False) -> str:
        """Text not handed out yet; before the end it stops short of anything that may become a stop string."""
        end = len(self.text) if (final or self.stopped) else len(self.text) - self._holdback()
        piece = self.text[self._emitted : end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return piece
