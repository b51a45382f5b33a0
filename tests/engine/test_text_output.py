"""Incremental detokenisation and stop-string hold-back."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from server.engine.detokenize import IncrementalDetokenizer
from server.engine.stop_strings import StopMatcher


def stream(tokenizer: PreTrainedTokenizerFast, text: str, prompt: str = "Q: ") -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt))
    pieces = [detok.push(token) for token in tokenizer.encode(text)]
    return [*pieces, detok.flush()]


def test_multibyte_characters_are_never_split(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "héllo 🙂 wörld — 日本語!"
    pieces = stream(tokenizer, text)
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    # The emoji is four byte tokens: three of them produce no text yet.
    assert pieces.count("") >= 3


def test_prompt_context_does_not_leak_into_output(tokenizer: PreTrainedTokenizerFast) -> None:
    assert "".join(stream(tokenizer, " answer", prompt="question?")) == " answer"


def test_stop_string_split_across_pieces_is_held_then_dropped() -> None:
    matcher = StopMatcher(("###",))
    assert matcher.feed("abc #") == "abc "
    assert matcher.feed("#") == ""
    assert matcher.feed("# tail") == ""
    assert matcher.stopped


def test_false_alarm_is_released() -> None:
    matcher = StopMatcher(("END",))
    assert matcher.feed("the E") == "the "
    assert matcher.feed("N") == ""
    assert matcher.feed("D") == ""
    assert matcher.stopped
    other = StopMatcher(("END",))
    assert other.feed("EN") == ""
    assert other.feed("X") == "ENX"
    assert not other.stopped


def test_earliest_of_several_stops_wins() -> None:
    matcher = StopMatcher(("world", "lo"))
    assert matcher.feed("hello world") == "hel"
    assert matcher.stopped


def test_flush_releases_held_text() -> None:
    matcher = StopMatcher(("STOP",))
    assert matcher.feed("aST") == "a"
    assert matcher.flush() == "ST"
    assert StopMatcher(()).feed("x") == "x"
