"""VQA v2 accuracy on hand-made cases; every expected value is worked out in the comment beside it."""
import json

import pytest

from hist_vlm.eval.vqa import (
    normalize_prediction,
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


def test_prediction_normalisation():
    assert normalize_prediction("Two") == "2"                  # lower case, number word -> digit
    assert normalize_prediction("  the dog\n") == "dog"        # whitespace, article dropped
    assert normalize_prediction("A red ball.") == "red ball"   # article, trailing period
    assert normalize_prediction("dont") == "don’t"             # contraction, typographic apostrophe
    assert normalize_prediction("yes!") == "yes!"              # "!" is not in the official list
    assert normalize_prediction("2.5") == "2.5"                # a period before a digit stays
    assert normalize_prediction("none") == "0"


def test_punctuation_rules():
    assert process_punctuation("black/white") == "black white"     # no space beside "/": a space
    assert process_punctuation("black / white") == "black  white"  # a space beside it: deleted
    assert process_punctuation("1,000") == "1000"                  # digit,digit: every mark deleted
    assert process_punctuation("man's") == "man s"


def test_gt_answers_are_processed_only_when_annotators_disagree():
    # disagreeing: "yes." -> "yes" by punctuation processing, so 9 annotators match -> 1
    assert question_accuracy("yes", ["yes."] * 9 + ["no"]) == 1.0
    # unanimous "Yes": left as is, and the prediction "yes" differs from "Yes" -> 0
    assert question_accuracy("yes", ["Yes"] * 10) == 0.0
    # annotators are never digit/article-normalised: "two" never equals the prediction's "2"
    assert question_accuracy("two", ["two"] * 5 + ["three"] * 5) == 0.0


def test_score_per_answer_type_and_results_file(tmp_path):
    annotations = [
        (1, ["yes"] * 10, "yes/no"),                     # correct -> 1
        (2, ["2"] * 2 + ["3"] * 8, "number"),            # "2": 18/30 = 0.6
        (3, ["red"] * 10, "other"),                      # wrong -> 0
        (4, ["no"] * 10, "yes/no"),                      # correct -> 1
    ]
    score = score_answers({1: "yes", 2: "two", 3: "blue", 4: "no"}, annotations)
    assert score.overall == 65.0                         # (1 + 0.6 + 0 + 1) / 4
    assert score.per_answer_type == {"yes/no": 100.0, "number": 60.0, "other": 0.0}
    with pytest.raises(ValueError, match="question_id 3"):
        score_answers({1: "yes"}, annotations[:1] + annotations[2:3])
    path = write_results(tmp_path / "r.json", [(1, "yes"), (2, "two")])
    assert json.loads(path.read_text()) == [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "two"}]
