"""Incremental detokenization and stop strings, with a character-level fake tokenizer."""

from splitserve.engine.detokenizer import IncrementalDetokenizer


class CharTokenizer:
    """token id = a character code; 0xFFFD is never produced (no multi-byte splits here)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def feed(detok, text):
    stop = None
    for ch in text:
        stop = detok.add(ord(ch))
        if stop:
            break
    return stop


def test_deltas_add_up_and_partial_stop_strings_are_held_back():
    d = IncrementalDetokenizer(CharTokenizer(), [ord("x")], stop=("END",))
    out = ""
    for ch in "abcEN":
        assert d.add(ord(ch)) is None
        out += d.take(finished=False)
    assert out == "abc"  # "EN" could start "END": held back
    assert d.add(ord("D")) == "END"
    out += d.take(finished=True)
    assert out == "abc" and d.text == "abc"


def test_earliest_stop_string_wins():
    d = IncrementalDetokenizer(CharTokenizer(), [], stop=("User:", "\n"))
    assert feed(d, "hi\nUser:") == "\n"
    assert d.text == "hi"


def test_include_stop_string():
    d = IncrementalDetokenizer(CharTokenizer(), [], stop=("##",), include_stop=True)
    assert feed(d, "ab##cd") == "##"
    assert d.text == "ab##"
