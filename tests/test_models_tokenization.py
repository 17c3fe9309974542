"""ALBEF's text conventions: pre_caption, [CLS] without [SEP], truncation, padding."""
from pathlib import Path

import pytest

from hist_vlm.models.tokenization import AlbefTokenizer, default_vocab_file, pre_caption


@pytest.fixture(scope="module")
def tok():
    return AlbefTokenizer()


def test_pre_caption_cleaning():
    assert pre_caption("A Man, riding a horse!") == "a man riding a horse"
    assert pre_caption('The "red" car (left); #1: ok?~*') == "the red car left 1 ok"
    assert pre_caption("left-hand side/street") == "left hand side street"
    assert pre_caption("a <person> with   a dog\n") == "a person with a dog"
    assert pre_caption("  one two three four ", max_words=2) == "one two"


def test_cls_without_sep_and_padding(tok):
    ids, mask = tok(["A dog.", "two red cars on the road"])
    assert ids.shape == mask.shape == (2, 7)
    assert (ids[:, 0] == tok.cls_token_id).all() and tok.cls_token_id == 101
    assert not (ids == 102).any()  # no [SEP]
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0, 0], [1] * 7]
    assert (ids[0, 3:] == tok.pad_token_id).all() and tok.pad_token_id == 0
    assert tok.decode(ids) == ["a dog", "two red cars on the road"]


def test_truncation_counts_cls(tok):
    ids, mask = tok(["one two three four five six seven eight"], max_length=5)
    assert ids.shape == (1, 5) and tok.decode(ids) == ["one two three four"]
    full, _ = tok(["one two three four five six seven eight"])
    assert full.shape == (1, 9)


def test_cleaning_can_be_switched_off(tok):
    raw = AlbefTokenizer(clean=False)
    assert raw(["a-b"])[0].shape[1] == 4  # [CLS] a - b
    assert tok(["a-b"])[0].shape[1] == 3  # [CLS] a b


def test_vocab_from_installed_package_and_errors(tok):
    assert Path(default_vocab_file()).name == "vocab.txt"
    assert tok.vocab_size == 30522 and tok.mask_token_id == 103
    with pytest.raises(ValueError, match="at least one text"):
        tok([])
    with pytest.raises(ValueError, match="max_length"):
        tok(["a"], max_length=0)
