"""Token ids -> streamed text: incremental detokenization and stop sequences.

Text is released token by token; a character split across tokens waits for its last byte, and
text that could still turn into a stop sequence is held back until it cannot (so a stream never
shows part of a stop sequence, and the concatenated deltas equal the final text).
"""

from __future__ import annotations


class TextAssembler:
    def __init__(self, tokenizer, stop: list[str] = ()):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far (up to a stop sequence, once one is found)
        self.sent = 0  # characters of ``text`` already released
        self.stopped = False  # a stop sequence was found: no more text
        self._prefix_offset = self._read_offset = 0

    def add(self, token: int) -> str:
        """Take one token; return the text it releases (maybe empty)."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        self.text += self._decode_step()
        if self.stop:
            start = max(0, self.sent - max(map(len, self.stop)) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
                return self._release(len(self.text))
            return self._release(len(self.text) - self._held_back())
        return self._release(len(self.text))

    def flush(self) -> str:
        """At the end: release what was held back for a stop sequence that never came."""
        return self._release(len(self.text))

    def _decode_step(self) -> str:
        """The new text of the last token, once it decodes to whole characters (the usual
        prefix/read-offset scheme, so each step decodes a few tokens, not the whole output)."""
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)
        prefix = decode(self.ids[self._prefix_offset:self._read_offset])
        current = decode(self.ids[self._prefix_offset:])
        if len(current) > len(prefix) and not current.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            return current[len(prefix):]
        return ""

    def _held_back(self) -> int:
        """Length of the longest tail of the text that starts some stop sequence."""
        for n in range(min(len(self.text), max(map(len, self.stop)) - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self.sent)
        out, self.sent = self.text[self.sent:upto], upto
        return out
