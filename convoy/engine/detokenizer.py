"""Incremental detokenization: a request's output token ids become text as they arrive."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

# The decode window starts this many tokens before the end of the prompt, so the first output
# token is decoded with left context (a sentencepiece decoder strips the leading space of the
# first token it sees; in context that space is real text). vLLM uses the same value.
INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET = 5

# What lossy UTF-8 decoding (byte-level BPE, sentencepiece byte fallback) yields for the bytes of
# a character that a later token completes.
_REPLACEMENT_CHAR = "\ufffd"


def _make_decode(
    tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool
) -> Callable[[list[int]], str]:
    """A function decoding a short list of ids, without any post-hoc space clean-up.

    ``clean_up_tokenization_spaces`` rewrites text across token boundaries (" ." -> "."), so
    decoding in windows would not agree with decoding the whole output: it stays off.
    """
    cls = type(tokenizer)
    if (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and cls._decode is PreTrainedTokenizerFast._decode
        and cls.decode is PreTrainedTokenizerBase.decode
    ):
        # With clean-up off, the wrapper's decode is exactly the Rust tokenizer's; calling it
        # directly saves most of the per-call cost, which is paid for every token of every request.
        backend = tokenizer.backend_tokenizer

        def decode_fast(ids: list[int]) -> str:
            text: str = backend.decode(ids, skip_special_tokens=skip_special_tokens)
            return text

        return decode_fast

    def decode_any(ids: list[int]) -> str:
        text = tokenizer.decode(
            ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )
        assert isinstance(text, str)
        return text

    return decode_any


class IncrementalDetokenizer:
    """Turns one sequence's output token ids into text, a step at a time.

    Contract:

    * ``update(ids)`` appends output token ids (one or several per engine step; several are
      processed one at a time, so results do not depend on how tokens are grouped) and returns
      the stop string that matched, if any. After a match ``output_text`` ends at the start of
      the match (or at its end with ``include_stop_str_in_output``), ids after the completing one
      are ignored, and calling ``update`` again raises ``RuntimeError``.
    * Text whose last character is incomplete (a byte-level or byte-fallback token split a
      multi-byte character; the decoder yields U+FFFD for it) is held back until a later token
      completes it. ``finish()`` flushes what is still held back, so at the end ``output_text``
      equals the decode of the whole output in the context of the prompt, i.e.
      ``decode(prompt + output)[len(decode(prompt)):]`` with ``skip_special_tokens`` as given and
      ``clean_up_tokenization_spaces=False`` (clean-up is not prefix-stable, so no incremental
      decoder can honour it), truncated at a stop string. (One known gap: sentencepiece's
      ByteFallback decoder turns a whole run of byte tokens into U+FFFDs when the run is invalid
      UTF-8, so a model emitting invalid bytes right after a complete byte-token character can
      rewrite text already emitted; valid text is always exact.)
    * ``get_delta(finished)`` returns the text not returned before. While not finished it also
      holds back the last ``max(len(s) for s in stop) - 1`` characters (unless
      ``include_stop_str_in_output``), so a client never sees the beginning of a stop string that
      is later cut off; the concatenation of all deltas is then always a prefix of the final
      ``output_text``, and equals it after ``get_delta(True)``.

    Each token costs one or two decodes of a window of a few tokens, never of the whole output.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        if isinstance(stop, str):  # a lone string would otherwise be read as one-char stops
            stop = [stop]
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty, got {list(stop)!r}")
        self._decode = _make_decode(tokenizer, skip_special_tokens)
        self._stop = tuple(dict.fromkeys(stop))  # de-duplicated, order kept
        self._include_stop = include_stop_str_in_output
        max_stop_len = max((len(s) for s in self._stop), default=0)
        # Enough characters to hide any proper prefix of a stop string from the stream.
        self._stream_holdback = 0 if include_stop_str_in_output else max(max_stop_len - 1, 0)

        # Only the prompt's tail is kept: ids[prefix_offset:read_offset] is text already emitted
        # (kept as context), ids[read_offset:] is what has not produced text yet.
        start = max(len(prompt_token_ids) - INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET, 0)
        prefix_text = self._decode(list(prompt_token_ids[start:]))
        # A window of skipped special tokens (a chat template's tail) decodes to nothing, and the
        # first output token would then lose its leading space as if it began the text: widen
        # the window until it holds some visible prompt text.
        while not prefix_text and start > 0:
            start = max(start - INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET, 0)
            prefix_text = self._decode(list(prompt_token_ids[start:]))
        self._ids: list[int] = list(prompt_token_ids[start:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        # decode(ids[prefix_offset:read_offset]); None until needed after the window moves.
        self._prefix_text: str | None = prefix_text

        self._text = ""
        self._num_returned = 0  # characters of _text handed out by get_delta
        self._matched_stop: str | None = None
        self._finished = False
        self._num_output_tokens = 0

    @property
    def num_output_tokens(self) -> int:
        """Output ids taken in by ``update``; after a stop string matched, up to the one that
        completed it (those after it were ignored)."""
        return self._num_output_tokens

    @property
    def output_text(self) -> str:
        """The output so far: complete characters only, truncated at a matched stop string."""
        return self._text

    @property
    def matched_stop(self) -> str | None:
        """The stop string that ended the text (found by ``update`` or by ``finish``), if any."""
        return self._matched_stop

    def update(self, new_token_ids: Sequence[int]) -> str | None:
        """Append new token ids; return the matched stop string (text truncated), else None."""
        if self._matched_stop is not None:
            raise RuntimeError(f"update() after stop string {self._matched_stop!r} matched")
        if self._finished:
            raise RuntimeError("update() after finish()")
        for token_id in new_token_ids:
            self._ids.append(token_id)
            self._num_output_tokens += 1
            delta = self._step()
            if delta and self._append(delta):
                return self._matched_stop
        return None

    def finish(self) -> None:
        """Flush held-back partial characters into output_text (call once, at the end).

        Calling it again, or after a stop string matched, does nothing. The flushed text is
        searched for stop strings too, so the final text is cut the same way whichever way the
        request ended; ``matched_stop`` tells whether that happened.
        """
        if self._finished:
            return
        self._finished = True
        if self._matched_stop is not None or self._read_offset == len(self._ids):
            return
        prefix_text = self._get_prefix_text()
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text):
            self._append(new_text[len(prefix_text) :])

    def get_delta(self, finished: bool) -> str:
        """Text produced since the last call (holding back a possible partial stop string unless
        finished).

        With ``finished`` True this also flushes held-back partial characters (as ``finish()``
        does), so the deltas always add up to the final ``output_text``.
        """
        if finished:
            self.finish()
        end = len(self._text)
        if not finished and self._matched_stop is None:
            # Once a stop matched the text is final and nothing more can be cut off.
            end -= self._stream_holdback
        if end <= self._num_returned:
            return ""
        delta = self._text[self._num_returned : end]
        self._num_returned = end
        return delta

    # -- internals ---------------------------------------------------------------------------
    def _get_prefix_text(self) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        return self._prefix_text

    def _step(self) -> str:
        """The text completed by the newest id ("" while it is held back)."""
        prefix_text = self._get_prefix_text()
        new_text = self._decode(self._ids[self._prefix_offset :])
        # No growth: a skipped special token, or a token whose text only appears together with
        # the next one. A trailing U+FFFD: the last character's remaining bytes are still to come.
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        # The window only ever starts at an id where earlier text was complete, so the decoders
        # are prefix-stable on it and the slice is exactly the new text.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = None  # computed on the next step; the last step never needs it
        return new_text[len(prefix_text) :]

    def _append(self, delta: str) -> bool:
        """Add text and look for stop strings ending in it; True (and truncate) on a match."""
        old_len = len(self._text)
        self._text += delta
        if not self._stop:
            return False
        best: tuple[int, int, str] | None = None
        for s in self._stop:
            # Start len(s) - 1 characters back: a stop straddling the previous text is found, and
            # a stop lying wholly in the previous text would already have ended the request.
            i = self._text.find(s, max(old_len - len(s) + 1, 0))
            # Earliest start wins; on a tie the shorter stop, as it completes first when the
            # text arrives character by character.
            if i >= 0 and (best is None or (i, len(s)) < best[:2]):
                best = (i, len(s), s)
        if best is None:
            return False
        start, length, matched = best
        self._text = self._text[: start + length if self._include_stop else start]
        self._matched_stop = matched
        return True
