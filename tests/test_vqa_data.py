"""VQA readers: ALBEF's answer weights, one-line errors naming the record, the synthetic set."""
import json

import pytest

from hist_vlm.demo.synthetic_vqa import ANNOTATORS, answer_list, generate_vqa_world
from hist_vlm.data.vqa import VqaFileError, read_answer_list, read_vqa_file


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_answer_weights_as_albef(tmp_path):
    path = _write(tmp_path, "vqa_train.json", [
        {"image": "a.jpg", "question": "q?", "answer": ["red"] * 7 + ["blue"] * 2 + ["pink"], "question_id": 1},
        {"image": "b.jpg", "question": "q?", "answer": ["2"], "question_id": 2, "dataset": "vg"},
    ])
    vqa, vg = read_vqa_file(path)
    answers, weights = vqa.weighted_answers()
    assert answers == ("red", "blue", "pink")                 # distinct, first-seen order
    assert weights == pytest.approx((0.7, 0.2, 0.1))          # share of the 10 annotators
    assert vg.weighted_answers() == (("2",), (0.5,))          # ALBEF's fixed VG weight


@pytest.mark.parametrize("record, message", [
    ({"question": "q?", "answer": ["x"], "question_id": 7}, r"record 1 \(question_id 7\): 'image'"),
    ({"image": "a.jpg", "question": "q?", "answer": 3, "question_id": 7}, "record 1.*'answer'"),
    ({"image": "a.jpg", "question": "", "answer": ["x"]}, "record 1: 'question'"),
    ({"image": "a.jpg", "question": "q", "answer": []}, "record 1: no answer"),
    ({"image": "a.jpg", "question": "q", "answer": ["x"], "dataset": "gqa"}, "record 1: dataset"),
    ({"image": "a.jpg", "question": "q", "answer": ["x", "y"], "dataset": "vg"}, "record 1: a Visual Genome"),
])
def test_bad_records_name_file_and_record(tmp_path, record, message):
    good = {"image": "a.jpg", "question": "q?", "answer": ["x"], "question_id": 1}
    path = _write(tmp_path, "bad.json", [good, record])
    with pytest.raises(VqaFileError, match=message) as err:
        read_vqa_file(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_bad_files(tmp_path):
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(VqaFileError, match="broken.json: not valid JSON"):
        read_vqa_file(tmp_path / "broken.json")
    with pytest.raises(VqaFileError, match="record 0.*no question_id"):
        read_vqa_file(_write(tmp_path, "test.json", [{"image": "a", "question": "q"}]), need_answers=False)
    with pytest.raises(VqaFileError, match="answer 2 'no' repeats answer 1"):
        read_answer_list(_write(tmp_path, "answers.json", ["yes", "no", "no"]))
    with pytest.raises(VqaFileError, match="not found"):
        read_vqa_file(tmp_path / "missing.json")


def test_synthetic_set_is_seeded_and_in_albef_layout(tmp_path):
    a = generate_vqa_world(tmp_path / "a", n_train=6, n_val=2, progress=False)
    b = generate_vqa_world(tmp_path / "b", n_train=3, n_val=2, progress=False)
    train_a, train_b = json.loads(a["train"].read_text()), json.loads(b["train"].read_text())
    # scene i depends on (seed, split, i) only: the first 3 scenes' questions agree
    assert train_b == [r for r in train_a if r["question_id"] % 10**7 // 10 < 3]
    records = read_vqa_file(a["train"])
    candidates = set(read_answer_list(a["answer_list"]))
    assert candidates == set(answer_list())
    assert {r.answer_type for r in records} == {"yes/no", "number", "other"}
    assert all(len(r.answers) == ANNOTATORS and set(r.answers) <= candidates for r in records)
    assert any(len(set(r.answers)) > 1 for r in records)           # some annotators disagree
    assert all(r.answers.count(max(set(r.answers), key=r.answers.count)) >= 7 for r in records)
    assert len({r.question_id for r in records}) == len(records)
    assert (tmp_path / "a" / records[0].image).is_file()
