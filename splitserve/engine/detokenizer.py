"""Incremental detokenization and stop strings.

Text is produced from a sliding window of tokens (prefix_offset, read_offset): decoding only the
last few tokens keeps each step O(1), and a decode that ends in U+FFFD (a multi-byte character cut
mid-way) is held back until the next token completes it. While stop strings are set, the last
len(longest stop) - 1 characters are held back too, so a stop string split across tokens is never
streamed out before it is recognised.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: tuple[str, ...] = (),
                 include_stop: bool = False):
        self.tok = tokenizer
        self.ids: list[int] = list(prompt_token_ids[-6:])  # context for leading-space handling
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.emitted = 0
        self.stop = stop
        self.include_stop = include_stop
        self.hold = max((len(s) for s in stop), default=1) - 1

    def add(self, token_id: int) -> str | None:
        """Append a token; returns the stop string if one now appears in the text."""
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = self.tok.decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            start = len(self.text)
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            if self.stop:
                return self._find_stop(start)
        return None

    def _find_stop(self, new_from: int) -> str | None:
        hits = []
        for s in self.stop:
            idx = self.text.find(s, max(0, new_from - len(s) + 1))
            if idx != -1:
                hits.append((idx, -len(s), s))
        if not hits:
            return None
        idx, _, s = min(hits)  # the earliest match in the text (longest first at a tie)
        self.text = self.text[: idx + len(s)] if self.include_stop else self.text[:idx]
        return s

    def take(self, finished: bool) -> str:
        """The text not yet handed out (all of it once finished)."""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
