"""VQA v2 accuracy on hand-made cases; every expected value is worked out in the comment beside it.

Reference: GT-Vision-Lab/VQA vqaEval.py at 458a8b2 (the default), a013f00 (`unanimous_unprocessed`).
Leave-one-out with 10 annotators of whom n give the (normalised) prediction:
  n = 0 -> 0;  n = 1 -> 9 * (1/3) / 10 = 0.3;  n = 2 -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6;
  n = 3 -> (3 * 2/3 + 7 * 1) / 10 = 0.9;  n >= 4 -> every subset holds >= 3 matches -> 1.
"""
import json

import pytest

from hist_vlm.eval.vqa import (
    CONTRACTIONS,
    PUNCTUATION,
    normalize_prediction,
    process_digit_article,
    process_punctuation,
    question_accuracy,
    score_answers,
    write_results,
)


def test_leave_one_out_accuracy_by_hand():
    # 10 x "2": each of the 10 subsets holds 9 matches -> min(9/3, 1) = 1
    assert question_accuracy("2", ["2"] * 10) == 1.0
    # 2 of 10 say "red": leaving out a "red" annotator leaves 1 match (1/3), twice;
    # leaving out any of the 8 others leaves 2 matches (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 18/30
    gts = ["red"] * 2 + ["blue"] * 8
    assert question_accuracy("red", gts) == pytest.approx(18 / 30)
    # 3 matches: leaving one of them out leaves 2 (2/3), x3; the 7 others leave 3 (1): (2 + 7) / 10
    assert question_accuracy("blue", ["blue"] * 3 + ["green"] * 7) == pytest.approx(0.9)
    # 4 matches: every subset holds >= 3 -> 1
    assert question_accuracy("blue", ["blue"] * 4 + ["green"] * 6) == 1.0
    # 1 match: leaving it out gives 0, the 9 others give 1/3: 9 * (1/3) / 10 = 0.3
    assert question_accuracy("blue", ["blue"] + ["green"] * 9) == pytest.approx(0.3)
    assert question_accuracy("yellow", ["blue"] * 10) == 0.0
    # duplicates are distinct annotators: 3 annotators, all "x": each subset has 2 -> 2/3
    assert question_accuracy("x", ["x"] * 3) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        question_accuracy("x", [])


def test_the_2015_beta_scoring_is_gone():
    # beta: ":" was punctuation, the prediction became "3 00" while ten unanimous "3:00" stayed -> 0.
    # 458a8b2: ":" is not in the list, "3:00" == "3:00" for all 10 annotators -> 1
    assert question_accuracy("3:00", ["3:00"] * 10) == 1.0
    assert ":" not in PUNCTUATION and "'" not in PUNCTUATION
    assert {"{", "}", "-", "!"} <= set(PUNCTUATION)
    assert normalize_prediction("dont") == "don't"          # ASCII apostrophe, not U+2019
    assert not any("\u2019" in k + v for k, v in CONTRACTIONS.items())
    assert process_punctuation("man's") == "man's"          # the apostrophe stays


def test_colon_times():
    # disagreeing annotators are punctuation-processed, but ":" survives: 4 x "3:00" match -> 1
    assert question_accuracy("3:00", ["3:00"] * 4 + ["3"] * 6) == 1.0
    assert normalize_prediction("3:00") == "3:00"


def test_exclamation_mark():
    # "yes!": "!" has no space beside it -> a space: "yes " -> split/join -> "yes";
    # 3 x "yes" among 10 disagreeing annotators -> 0.9 (beta: "yes!" stayed, 0)
    assert normalize_prediction("yes!") == "yes"
    assert question_accuracy("yes!", ["yes"] * 3 + ["no"] * 7) == pytest.approx(0.9)
    # unanimous "yes" is compared as is, and the prediction is "yes" -> 10 matches -> 1
    assert question_accuracy("yes!", ["yes"] * 10) == 1.0


def test_hyphen():
    # "t-shirt" -> "t shirt"; 3 x "t shirt" -> 0.9 (beta: "-" was kept, 0)
    assert question_accuracy("t-shirt", ["t shirt"] * 3 + ["shirt"] * 7) == pytest.approx(0.9)
    # the annotators' "t-shirt" (disagreeing) also becomes "t shirt": 3 matches -> 0.9
    assert question_accuracy("t shirt", ["t-shirt"] * 3 + ["shirt"] * 7) == pytest.approx(0.9)
    # a hyphen beside a space is deleted, not spaced: "ice - cream" -> "ice  cream" -> "ice cream"
    assert normalize_prediction("ice - cream") == "ice cream"


def test_braces():
    # "{red}": "{" and "}" have no space beside them -> spaces: " red " -> "red"; 4 matches -> 1
    assert normalize_prediction("{red}") == "red"
    assert question_accuracy("{red}", ["red"] * 4 + ["blue"] * 6) == 1.0
    assert process_punctuation("{ red }") == " red "        # beside a space: deleted


def test_ascii_contractions():
    # "dont know" -> "don't know" (ASCII); 2 of 10 say "don't know" -> 0.6 (beta: "don’t know", 0)
    gts = ["don't know"] * 2 + ["no"] * 8
    assert normalize_prediction("dont know") == "don't know"
    assert question_accuracy("dont know", gts) == pytest.approx(0.6)
    # the annotators never get the contraction table: unanimous "dont know" stays, prediction
    # "don't know" (no mark of the list, not a key) differs -> 0
    assert question_accuracy("don't know", ["dont know"] * 10) == 0.0
    assert process_digit_article("hes") == "he's"
    assert process_digit_article("somebody'd") == "somebodyd"   # the official table's slip, kept
    assert process_digit_article("Im") == "im"                  # lower-cased first: "Im" never matches


def test_number_words():
    # "Two" -> "two" -> "2"; 3 x "2" -> 0.9
    assert question_accuracy("Two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert normalize_prediction("none") == "0" and normalize_prediction("ten") == "10"
    assert normalize_prediction("eleven") == "eleven"            # only none/zero..ten
    # annotators are never digit-normalised: their "two" never equals the prediction's "2"
    assert question_accuracy("two", ["two"] * 5 + ["three"] * 5) == 0.0


def test_articles():
    # "the dog" -> "dog"; unanimous "dog" -> 1
    assert question_accuracy("the dog", ["dog"] * 10) == 1.0
    assert normalize_prediction("A red ball.") == "red ball"    # article, trailing period
    # annotators keep their article: prediction "dog" vs 4 x "a dog" -> 0
    assert question_accuracy("a dog", ["a dog"] * 4 + ["cat"] * 6) == 0.0


def test_thousands_comma():
    # a digit-comma-digit group: every mark is deleted, never spaced
    assert process_punctuation("1,000") == "1000"
    assert process_punctuation("1,000 t-shirts") == "1000 tshirts"
    assert process_punctuation("red,blue") == "red blue"          # no digit group: a space
    # disagreeing annotators' "1,000" -> "1000": 3 matches -> 0.9
    assert question_accuracy("1000", ["1,000"] * 3 + ["lots"] * 7) == pytest.approx(0.9)
    # unanimous "1,000" is not processed, the prediction becomes "1000" -> 0 (official quirk)
    assert question_accuracy("1,000", ["1,000"] * 10) == 0.0


def test_periods():
    assert normalize_prediction("2.5") == "2.5"                  # a period before a digit stays
    assert normalize_prediction("st. louis") == "st louis"       # otherwise deleted
    assert process_punctuation("." * 40) == "." * 8              # re.UNICODE passed as count: 32
    assert process_punctuation("5.\u0665") == "5\u0665"          # Python 2's \d: ASCII digits only
    # disagreeing "dog." -> "dog": 3 matches -> 0.9
    assert question_accuracy("dog", ["dog."] * 3 + ["cat"] * 7) == pytest.approx(0.9)


def test_other_punctuation_rules():
    assert process_punctuation("black/white") == "black white"     # no space beside "/": a space
    assert process_punctuation("black / white") == "black  white"  # a space beside it: deleted
    # so disagreeing annotators' "black / white" keeps a double space and never equals the
    # prediction's single-spaced "black white" -> 0
    assert question_accuracy("black/white", ["black / white"] * 3 + ["gray"] * 7) == 0.0
    assert normalize_prediction("  the dog\n") == "dog"            # whitespace, article


def test_gt_answers_are_processed_only_when_annotators_disagree():
    # disagreeing: "yes." -> "yes" by punctuation processing, so 9 annotators match -> 1
    assert question_accuracy("yes", ["yes."] * 9 + ["no"]) == 1.0
    # unanimous "Yes": left as is, and the prediction "yes" differs from "Yes" -> 0
    assert question_accuracy("yes", ["Yes"] * 10) == 0.0


def test_unanimous_unprocessed_option_a013f00():
    opt = {"unanimous_unprocessed": True}
    # unanimous: nothing is normalised on either side, exact match only
    assert question_accuracy("yes!", ["yes"] * 10, **opt) == 0.0        # default: 1 (above)
    assert question_accuracy("1,000", ["1,000"] * 10, **opt) == 1.0     # default: 0 (above)
    assert question_accuracy("the dog", ["dog"] * 10, **opt) == 0.0     # default: 1
    # ... except whitespace: annotators' and prediction's newlines/tabs/ends are cleaned -> 10 matches
    assert question_accuracy("yes\n", [" yes\t"] * 10, **opt) == 1.0
    # disagreeing: both sides get punctuation and digit/article processing:
    # annotators "two" -> "2" (5 of them), prediction "two" -> "2": 5 matches -> 1 (default: 0)
    assert question_accuracy("two", ["two"] * 5 + ["three"] * 5, **opt) == 1.0
    # annotators "dont know" -> "don't know" (2 of them): 0.6
    assert question_accuracy("don't know", ["dont know"] * 2 + ["no"] * 8, **opt) == pytest.approx(0.6)
    score = score_answers({1: "yes!"}, [(1, ["yes"] * 10, None)], **opt)
    assert score.overall == 0.0


def test_score_per_answer_type_and_results_file(tmp_path):
    annotations = [
        (1, ["yes"] * 10, "yes/no"),                     # correct -> 1
        (2, ["2"] * 2 + ["3"] * 8, "number"),            # "two" -> "2": 18/30 = 0.6
        (3, ["red"] * 10, "other"),                      # wrong -> 0
        (4, ["no"] * 10, "yes/no"),                      # correct -> 1
    ]
    score = score_answers({1: "yes", 2: "two", 3: "blue", 4: "no"}, annotations)
    assert score.overall == 65.0                         # (1 + 0.6 + 0 + 1) / 4
    # per type: the mean of its questions' accuracies, as 458a8b2
    assert score.per_answer_type == {"yes/no": 100.0, "number": 60.0, "other": 0.0}
    with pytest.raises(ValueError, match="question_id 3"):
        score_answers({1: "yes"}, annotations[:1] + annotations[2:3])
    path = write_results(tmp_path / "r.json", [(1, "yes"), (2, "two")])
    assert json.loads(path.read_text()) == [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "two"}]


def test_rounding_is_python2_half_away_from_zero():
    # 1 correct question of 800: 100 * 1 / 800 = 0.125 exactly; Python 2's round(0.125, 2) = 0.13
    # (the official number), Python 3's round() would give 0.12
    annotations = [(i, ["yes"] * 10, None) for i in range(800)]
    predictions = {i: ("yes" if i == 0 else "no") for i in range(800)}
    assert score_answers(predictions, annotations).overall == 0.13
