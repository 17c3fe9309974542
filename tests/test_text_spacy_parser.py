"""SpacyParser: phrase spans, subjects and the Flickr30k-style phrase rules."""
import subprocess
import sys

import pytest

from hist_vlm.text.spacy_parser import SpacyParser
from hist_vlm.text.types import Phrase

CAPTIONS = [
    "A group of people stand near a pile of rocks.",
    "Two children and their dogs run across the fields.",
    "A man in a blue hard hat and orange safety vest stands in an intersection while holding a flag.",
    "A man stands in front of a building on top of a hill.",
    "A woman wearing a t-shirt hugs her while they watch it.",
    "Two dogs chase each other.",
    "",
    "Three women are playing volleyball, the woman in blue has hit the ball over the net.",
]


@pytest.fixture(scope="module")
def parser():
    return SpacyParser()


def texts(phrases):
    return [p.text for p in phrases]


def test_spans_match_caption_and_subjects_lie_inside(parser):
    for caption, phrases in zip(CAPTIONS, parser.parse_many(CAPTIONS)):
        for p in phrases:
            assert isinstance(p, Phrase)
            assert caption[p.start:p.end] == p.text
            assert caption[p.subject_start:p.subject_end] == p.subject
            assert p.start <= p.subject_start < p.subject_end <= p.end
            assert p.subject_lemma == p.subject_lemma.lower() and p.subject_lemma


def test_pronouns_and_reciprocals_dropped(parser):
    assert texts(parser.parse("A woman wearing a t-shirt hugs her while they watch it.")) == ["A woman", "a t-shirt"]
    assert texts(parser.parse("Two dogs chase each other.")) == ["Two dogs"]
    assert texts(parser.parse("Two men talk, one of them holds a cup.")) == ["Two men", "a cup"]


def test_x_of_y_is_one_phrase_with_the_last_noun_as_subject(parser):
    phrases = parser.parse("A group of people stand near a pile of rocks.")
    assert texts(phrases) == ["A group of people", "a pile of rocks"]
    assert [(p.subject, p.subject_lemma) for p in phrases] == [("people", "people"), ("rocks", "rock")]


def test_compound_prepositions_are_no_phrases(parser):
    phrases = parser.parse("A man stands in front of a building on top of a hill.")
    assert texts(phrases) == ["A man", "a building", "a hill"]
    # with a determiner the noun is a real place: "the top of a ramp" is one phrase
    assert "the top of a ramp" in texts(parser.parse("A skater stands at the top of a ramp."))


def test_colour_alone_is_a_phrase(parser):
    phrases = parser.parse("Three women are playing volleyball, the woman in blue has hit the ball over the net.")
    assert "blue" in texts(phrases)
    assert "red and white" in texts(parser.parse("A football player in red and white is holding the ball."))


def test_plural_subjects_are_lemmatized(parser):
    phrases = parser.parse("Two children and their dogs run across the fields.")
    assert [(p.subject, p.subject_lemma) for p in phrases] == [
        ("children", "child"), ("dogs", "dog"), ("fields", "field")]


def test_misread_verb_is_not_part_of_the_phrase(parser):
    # the small model tags "leaps" as a plural noun; a noun with a subject or after "a" is a verb
    assert texts(parser.parse("A small dog leaps over a stream.")) == ["A small dog", "a stream"]


def test_parse_many_keeps_input_order_and_is_deterministic(parser):
    one_by_one = [parser.parse(c) for c in CAPTIONS]
    assert list(parser.parse_many(CAPTIONS, batch_size=3)) == one_by_one
    assert list(parser.parse_many(list(reversed(CAPTIONS)))) == one_by_one[::-1]
    for phrases in one_by_one:
        assert [p.start for p in phrases] == sorted(p.start for p in phrases)


def test_empty_caption_has_no_phrases(parser):
    assert parser.parse("") == []
    assert parser.parse("   ") == []


def test_name_version_and_bad_workers():
    assert SpacyParser.name == "spacy" and isinstance(SpacyParser.version, str)
    with pytest.raises(ValueError, match="workers"):
        SpacyParser(workers=0)


def test_parser_never_imports_torch():
    code = ("import sys; from hist_vlm.text.spacy_parser import SpacyParser; "
            "assert SpacyParser().parse('a dog on a sofa')[0].subject == 'dog'; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "import torch; torch.zeros(1)")  # torch itself stays importable afterwards
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_workers_give_the_same_phrases_in_order(parser):
    captions = CAPTIONS * 4
    assert list(SpacyParser(workers=2).parse_many(captions, batch_size=4)) == list(parser.parse_many(captions))
