"""IncrementalDetokenizer against two locally built tokenizers (nothing is downloaded).

* ``bytelevel``: GPT-2/Qwen style byte-level BPE; its small ASCII-trained vocabulary splits
  emoji, CJK and accented characters into several byte tokens.
* ``metaspace``: Llama/sentencepiece style (``▁`` for spaces, byte-fallback tokens
  ``<0x00>``..``<0xFF>`` for every character outside the vocabulary, a decoder that strips the
  leading space of the first token it decodes).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from convoy.engine.detokenizer import (
    INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET,
    IncrementalDetokenizer,
)

# ASCII only, and without newlines, so anything else needs several byte tokens.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a small test corpus for the tokenizer.",
    "def main(): return 42 if x > 0 else -1",
    "Streaming text one token at a time is what an engine does.",
] * 20

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Emoji 😀 in the middle 🎉!",
    "日本語のテキスト and 中文",
    "café naïve résumé — “quoted”",
    "line one\nline two\n\n    indented",
    "👨‍👩‍👧 family😀😀",
    "ends with emoji 🎉",
]

PROMPTS = ["", "The prompt:", "A prompt ending in an emoji 😀"]

# Text-bearing characters outside both vocabularies, for random sequences.
EXOTIC = ["é", "ß", "—", "“", "😀", "🎉", "日", "本", "中", "文", "\n", "\t"]


def _bytelevel() -> PreTrainedTokenizerBase:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<s>", "</s>"],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _metaspace() -> PreTrainedTokenizerBase:
    # Train the merges on ASCII, then rebuild the model with the 256 byte-fallback tokens added
    # as ordinary (non-special) vocabulary, as in Llama's tokenizer.json.
    specials = ["<unk>", "<s>", "</s>"]
    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    draft.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=250,
        special_tokens=specials,
        initial_alphabet=[chr(c) for c in range(0x20, 0x7F)] + ["▁"],
        show_progress=False,
    )
    draft.train_from_iterator(CORPUS, trainer)
    spec = json.loads(draft.to_str())["model"]
    vocab: dict[str, int] = spec["vocab"]
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


_BUILDERS: dict[str, Callable[[], PreTrainedTokenizerBase]] = {
    "bytelevel": _bytelevel,
    "metaspace": _metaspace,
}


@pytest.fixture(scope="module", params=sorted(_BUILDERS))
def tok(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    return _BUILDERS[request.param]()


def is_bytelevel(tok: PreTrainedTokenizerBase) -> bool:
    return "<0x00>" not in tok.get_vocab()


def encode(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False)) if text else []


def decode(tok: PreTrainedTokenizerBase, ids: list[int], *, skip: bool = True) -> str:
    text = tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    assert isinstance(text, str)
    return text


def eos_id(tok: PreTrainedTokenizerBase) -> int:
    assert isinstance(tok.eos_token_id, int)
    return tok.eos_token_id


def in_context(
    tok: PreTrainedTokenizerBase, prompt: list[int], output: list[int], *, skip: bool = True
) -> str:
    """The reference text of ``output`` generated after ``prompt``.

    Decoding ``output`` alone is not the right reference in general: the metaspace decoder
    strips the leading space of the first token it sees, so decode(output) loses the space that
    " Hello" after a prompt really has. Decoding prompt + output and removing the decoded prompt
    gives the text as it reads after the prompt; for the byte-level tokenizer (no stripping) and
    a prompt that ends on a character boundary it equals decode(output), checked below.
    """
    full = decode(tok, prompt + output, skip=skip)
    head = decode(tok, prompt, skip=skip)
    assert full.startswith(head)
    return full[len(head) :]


def stream(
    tok: PreTrainedTokenizerBase,
    prompt: list[int],
    output: Sequence[int],
    *,
    chunk: int = 1,
    **kwargs: Any,
) -> tuple[IncrementalDetokenizer, list[str], str | None, int]:
    """Feed ``output`` ``chunk`` ids at a time like the engine does, reading a delta after each
    step. Returns the detokenizer, the deltas (the last one read as finished), the matched stop
    string and how many ids had been fed when it matched.

    After every step it checks the streaming invariant: what the client has received is a
    prefix of the text (it is never taken back), and the final text is checked by the caller.
    """
    det = IncrementalDetokenizer(tok, prompt, **kwargs)
    deltas: list[str] = []
    matched: str | None = None
    fed = 0
    for i in range(0, len(output), chunk):
        ids = output[i : i + chunk]
        matched = det.update(ids)
        deltas.append(det.get_delta(finished=matched is not None))
        assert det.output_text.startswith("".join(deltas))
        if matched is not None:
            fed = i + len(ids)
            break
    det.finish()
    deltas.append(det.get_delta(finished=True))
    assert "".join(deltas) == det.output_text
    return det, deltas, matched, fed


def test_tokenizers_split_characters(tok: PreTrainedTokenizerBase) -> None:
    # The premise of the U+FFFD tests: a lone token of these characters is an incomplete one.
    for ch in ["😀", "日", "é"]:
        ids = encode(tok, ch)
        assert len(ids) > 1
        assert "\ufffd" in decode(tok, ids[-1:])


@pytest.mark.parametrize("prompt_text", PROMPTS)
@pytest.mark.parametrize("text", TEXTS)
def test_text_matches_decode_and_never_breaks_utf8(
    tok: PreTrainedTokenizerBase, text: str, prompt_text: str
) -> None:
    prompt = encode(tok, prompt_text)
    output = encode(tok, text)
    det, deltas, matched, _ = stream(tok, prompt, output)
    expected = in_context(tok, prompt, output)
    assert matched is None
    assert "\ufffd" not in expected
    assert det.output_text == expected
    assert all("\ufffd" not in d for d in deltas)
    # Without prompt the text is exactly what was encoded (both decoders drop the one space a
    # metaspace encoder adds in front).
    if not prompt:
        assert det.output_text == text
    if is_bytelevel(tok):  # no stripping: decoding the output alone is equivalent
        assert det.output_text == decode(tok, output)


def test_first_token_gets_its_leading_space(tok: PreTrainedTokenizerBase) -> None:
    prompt = encode(tok, "The prompt:")
    det, _, _, _ = stream(tok, prompt, encode(tok, " Hello"))
    assert det.output_text == " Hello"
    # A prompt ending in more special tokens than the initial context window still counts.
    eos = eos_id(tok)
    det, _, _, _ = stream(tok, prompt + [eos] * 8, encode(tok, " Hello"))
    assert det.output_text == in_context(tok, prompt + [eos] * 8, encode(tok, " Hello"))
    assert det.output_text == " Hello"


def test_partial_character_is_held_back(tok: PreTrainedTokenizerBase) -> None:
    prompt = encode(tok, "x")
    output = encode(tok, " 😀")
    det = IncrementalDetokenizer(tok, prompt)
    deltas = []
    for token_id in output:
        assert det.update([token_id]) is None
        deltas.append(det.get_delta(finished=False))
    # Nothing of the emoji shows until its last byte arrives, then all of it at once.
    assert "".join(deltas) == " 😀"
    assert deltas[-1].endswith("😀")
    assert deltas[-2] == ""


def test_finish_flushes_incomplete_character(tok: PreTrainedTokenizerBase) -> None:
    prompt = encode(tok, "The prompt:")
    output = encode(tok, " Hello 😀")[:-1]  # cut inside the emoji
    det, deltas, _, _ = stream(tok, prompt, output)
    expected = in_context(tok, prompt, output)
    assert expected.endswith("\ufffd")
    assert det.output_text == expected
    assert "\ufffd" in deltas[-1]  # only the flush carries it


def _random_output(tok: PreTrainedTokenizerBase, rng: random.Random, n: int) -> list[int]:
    """Random ids. The byte-level decoder decodes the whole byte string lossily, so any ids are
    fine. Sentencepiece's ByteFallback decoder instead replaces *every* byte of an invalid run of
    byte tokens, so an invalid byte can turn an already complete byte token before it (e.g.
    ``<0x0A>``) into U+FFFD after the fact; no incremental decoder can be exact there, so for it
    the random ids are ordinary tokens and complete characters (random in how they split)."""
    vocab = tok.get_vocab()
    if is_bytelevel(tok):
        return [rng.randrange(len(vocab)) for _ in range(n)]
    ordinary = [i for t, i in vocab.items() if not t.startswith("<0x")]
    out: list[int] = []
    while len(out) < n:
        if rng.random() < 0.3:
            out += [vocab[f"<0x{b:02X}>"] for b in rng.choice(EXOTIC).encode()]
        else:
            out.append(rng.choice(ordinary))
    return out


@pytest.mark.parametrize("seed", range(20))
def test_random_ids(tok: PreTrainedTokenizerBase, seed: int) -> None:
    rng = random.Random(seed)
    prompt = encode(tok, "Random:")
    output = _random_output(tok, rng, 40)
    for skip in (True, False):
        det, deltas, _, _ = stream(tok, prompt, output, skip_special_tokens=skip)
        expected = in_context(tok, prompt, output, skip=skip)
        assert det.output_text == expected
        if "\ufffd" not in expected:
            assert all("\ufffd" not in d for d in deltas)
        chunked, _, _, _ = stream(tok, prompt, output, chunk=3, skip_special_tokens=skip)
        assert chunked.output_text == expected


@pytest.mark.parametrize("text", TEXTS)
def test_chunks_of_three_match_one_at_a_time(tok: PreTrainedTokenizerBase, text: str) -> None:
    prompt = encode(tok, "The prompt:")
    output = encode(tok, text)
    one, _, _, _ = stream(tok, prompt, output)
    three, _, _, _ = stream(tok, prompt, output, chunk=3)
    assert three.output_text == one.output_text


def _token_ends(tok: PreTrainedTokenizerBase, prompt: list[int], output: list[int]) -> list[int]:
    """Character offset in the output text at which each output token's text ends."""
    return [len(in_context(tok, prompt, output[: k + 1])) for k in range(len(output))]


def _straddles(ends: list[int], start: int, end: int) -> bool:
    """True if [start, end) begins inside a token and crosses a token boundary."""
    return start not in [0, *ends] and any(start < e < end for e in ends)


STOP_TEXT = " The quick brown fox jumps over the lazy dog."


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("chunk", [1, 3])
def test_stop_string_across_tokens(tok: PreTrainedTokenizerBase, include: bool, chunk: int) -> None:
    prompt = encode(tok, "Say:")
    output = encode(tok, STOP_TEXT)
    full = in_context(tok, prompt, output)
    stop = "ck brow"
    start = full.index(stop)
    ends = _token_ends(tok, prompt, output)
    assert _straddles(ends, start, start + len(stop))
    det, _, matched, fed = stream(
        tok, prompt, output, chunk=chunk, stop=[stop], include_stop_str_in_output=include
    )
    assert matched == stop == det.matched_stop
    assert det.output_text == full[: start + len(stop) if include else start]
    # Matched on the token that completes it (or on the chunk holding that token).
    completing = next(k for k, e in enumerate(ends) if e >= start + len(stop))
    assert fed == min(len(output), (completing // chunk + 1) * chunk)
    with pytest.raises(RuntimeError):
        det.update(output[:1])


def test_streaming_never_shows_partial_stop(tok: PreTrainedTokenizerBase) -> None:
    prompt = encode(tok, "Say:")
    output = encode(tok, STOP_TEXT)
    full = in_context(tok, prompt, output)
    stops = ["fox jumps", "brown cow"]  # "brown " is a stop's prefix, yet the stop never comes
    det = IncrementalDetokenizer(tok, prompt, stop=stops)
    seen = ""
    for token_id in output:
        matched = det.update([token_id])
        seen += det.get_delta(finished=matched is not None)
        assert "fox" not in seen
        if matched is None:
            # Exactly max(len) - 1 characters are held back while running.
            assert len(seen) == max(len(det.output_text) - (len("fox jumps") - 1), 0)
        else:
            break
    assert matched == "fox jumps"
    seen += det.get_delta(finished=True)
    assert seen == det.output_text == full[: full.index("fox jumps")]


def test_no_stop_match_streams_everything(tok: PreTrainedTokenizerBase) -> None:
    prompt = encode(tok, "Say:")
    output = encode(tok, STOP_TEXT)
    det, deltas, matched, _ = stream(tok, prompt, output, stop=["zebra", "dog!"])
    assert matched is None
    assert det.output_text == in_context(tok, prompt, output)
    # The last len("zebra") - 1 characters are held back until the end.
    assert deltas[-1] == "dog."


def test_earliest_stop_wins(tok: PreTrainedTokenizerBase) -> None:
    prompt = encode(tok, "Say:")
    output = encode(tok, STOP_TEXT)
    full = in_context(tok, prompt, output)
    det, _, matched, _ = stream(tok, prompt, output, stop=["lazy", "brown", "quick"])
    assert matched == "quick"
    assert det.output_text == full[: full.index("quick")]

    # Both end on the same character, so on the same token: the one starting earlier wins,
    # whatever the list order.
    jumps_end = full.index("jumps") + len("jumps")
    for include in (False, True):
        det, _, matched, _ = stream(
            tok, prompt, output, stop=["umps", "jumps"], include_stop_str_in_output=include
        )
        assert matched == "jumps"
        assert det.output_text == full[: jumps_end if include else full.index("jumps")]

    # Same start and completed by the same token: the shorter one, which a stream arriving
    # character by character would meet first.
    own = full.index("own")
    assert not any(own < e < own + 3 for e in _token_ends(tok, prompt, output))
    det, _, matched, _ = stream(
        tok, prompt, output, stop=["own", "ow"], include_stop_str_in_output=True
    )
    assert matched == "ow"
    assert det.output_text == full[: own + 2]


def test_stop_string_in_multibyte_text(tok: PreTrainedTokenizerBase) -> None:
    prompt = encode(tok, "Say:")
    output = encode(tok, " 日本語のテキスト 😀🎉 end")
    full = in_context(tok, prompt, output)
    for stop, include in [("語の", False), ("😀🎉", True), ("🎉", False)]:
        det, deltas, matched, _ = stream(
            tok, prompt, output, stop=[stop], include_stop_str_in_output=include
        )
        i = full.index(stop)
        assert matched == stop
        assert det.output_text == full[: i + len(stop) if include else i]
        assert all("\ufffd" not in d for d in deltas)


def test_stop_string_found_in_flushed_text(tok: PreTrainedTokenizerBase) -> None:
    prompt = encode(tok, "Say:")
    output = encode(tok, " ab 😀")[:-1]  # ends inside the emoji: " ab " + U+FFFD comes at finish
    det = IncrementalDetokenizer(tok, prompt, stop=["\ufffd"])
    assert det.update(output) is None
    det.finish()
    assert det.matched_stop == "\ufffd"
    assert det.output_text == " ab "


def test_skip_special_tokens(tok: PreTrainedTokenizerBase) -> None:
    prompt = encode(tok, "Say:")
    eos = eos_id(tok)
    output = [*encode(tok, " Hello"), eos, *encode(tok, " world"), eos]
    shown, _, _, _ = stream(tok, prompt, output, skip_special_tokens=False)
    assert shown.output_text == " Hello</s> world</s>"
    assert shown.output_text == in_context(tok, prompt, output, skip=False)
    hidden, _, _, _ = stream(tok, prompt, output, skip_special_tokens=True)
    assert hidden.output_text == " Hello world"
    assert hidden.output_text == in_context(tok, prompt, output)


def test_decodes_only_small_windows(tok: PreTrainedTokenizerBase) -> None:
    # White-box: the per-token cost must not grow with the output length.
    prompt = encode(tok, "The prompt: " * 20)
    output = encode(tok, STOP_TEXT * 10)
    det = IncrementalDetokenizer(tok, prompt)
    sizes: list[int] = []
    decode = det._decode

    def spy(ids: list[int]) -> str:
        sizes.append(len(ids))
        return decode(ids)

    det._decode = spy
    for token_id in output:
        det.update([token_id])
    det.finish()
    assert det.output_text == in_context(tok, prompt, output)
    assert len(sizes) <= 2 * len(output)
    # The prompt's tail plus the first output token is the widest window.
    assert max(sizes) <= INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET + 1


def test_update_after_finish_raises(tok: PreTrainedTokenizerBase) -> None:
    det = IncrementalDetokenizer(tok, encode(tok, "Say:"))
    det.update(encode(tok, " hi"))
    det.finish()
    det.finish()  # idempotent
    with pytest.raises(RuntimeError):
        det.update(encode(tok, " again"))


def test_rejects_empty_stop_string(tok: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError):
        IncrementalDetokenizer(tok, [], stop=["ok", ""])


def test_finished_delta_flushes_without_finish_call(tok: PreTrainedTokenizerBase) -> None:
    prompt = encode(tok, "Say:")
    output = encode(tok, " ab 😀")[:-1]
    det = IncrementalDetokenizer(tok, prompt)
    det.update(output)
    assert det.get_delta(finished=False) == " ab "
    assert det.get_delta(finished=True) == in_context(tok, prompt, output)[len(" ab ") :]
    assert det.get_delta(finished=True) == ""
