"""`hist-vlm parse`: the output schema, the summary, the cache, and one-line errors on bad input."""
import json
import re
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from hist_vlm.cli import app
from hist_vlm.text.cache import CACHE_FILE, ParseCache
from hist_vlm.text.spacy_parser import SpacyParser


def run(*args, env=None):
    return CliRunner().invoke(app, ["parse", *map(str, args)], env=env)


def check_record(rec):
    """The documented schema, with offsets that point at the texts they claim."""
    assert set(rec) == {"image", "captions", "phrases", "pairs"}
    for p in rec["phrases"]:
        cap = rec["captions"][p["caption_index"]]
        assert cap[p["start"] : p["end"]] == p["text"]
        assert cap[p["subject_start"] : p["subject_end"]] == p["subject"]
        assert p["start"] <= p["subject_start"] < p["subject_end"] <= p["end"]
    for i, j in rec["pairs"]:
        assert rec["phrases"][i]["subject_lemma"] != rec["phrases"][j]["subject_lemma"]


def test_text_prints_phrases_readably():
    res = run("--text", "a dog chasing a red frisbee")
    assert res.exit_code == 0, res.output
    assert "caption: a dog chasing a red frisbee" in res.stdout
    assert "'a red frisbee'" in res.stdout and "subject 'frisbee'" in res.stdout and "[ 14:27 ]" in res.stdout


def test_sample_writes_schema_and_prints_pairs(tmp_path):
    out = tmp_path / "sample.jsonl"
    res = run("--sample", "--out", out, "--cache-dir", tmp_path / "cache")
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 20 and all(len(r["captions"]) == 5 for r in recs)
    for rec in recs:
        check_record(rec)
    assert sum(bool(r["pairs"]) for r in recs) >= 18
    assert "image dog_frisbee.jpg" in res.stdout and "pair " in res.stdout and " and " in res.stdout
    assert "20 images, 100 captions" in res.stdout and "captions/s" in res.stderr
    assert "cache: 0 hits, 100 parsed" in res.stdout
    again = run("--sample", "--out", tmp_path / "again.jsonl", "--cache-dir", tmp_path / "cache")
    assert "cache: 100 hits, 0 parsed" in again.stdout
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()


def test_coco_file_seed_and_env_cache(tmp_path):
    src = tmp_path / "captions_val2014.json"
    src.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [{"image_id": 1, "caption": c} for c in (
            "A man throws a frisbee to a dog.", "a woman and a child on a bench", "Two dogs near a tree and a car.")]
        + [{"image_id": 2, "caption": "a cat"}],
    }))
    env = {"HIST_VLM_CACHE": str(tmp_path / "envcache")}
    outs = {}
    for seed in (0, 0, 1):
        out = tmp_path / f"out{seed}.jsonl"
        res = run(src, "--format", "coco", "--out", out, "--seed", seed, env=env)
        assert res.exit_code == 0, res.output
        outs.setdefault(seed, []).append(out.read_text())
    assert (tmp_path / "envcache" / "parses.sqlite3").is_file()
    assert outs[0][0] == outs[0][1] and outs[0][0] != outs[1][0]
    a, b = [json.loads(line) for line in outs[0][0].splitlines()]
    check_record(a)
    assert (a["image"], b["image"], b["pairs"]) == ("a.jpg", "b.jpg", [])
    assert "images with at least one pair: 1 of 2" in res.stdout


def test_empty_and_long_captions_are_counted(tmp_path):
    src = tmp_path / "c.jsonl"
    long = "a dog " + "very " * 100 + "big"
    src.write_text(json.dumps({"image": "x", "captions": ["", "a dog", long]}) + "\n" + json.dumps({"image": "y", "captions": ["  "]}) + "\n")
    res = run(src, "--format", "jsonl", "--out", tmp_path / "o.jsonl", "--no-cache")
    assert res.exit_code == 0, res.output
    assert "captions skipped: 2 empty; images without a usable caption: 1; captions truncated at 300 characters: 1" in res.stdout
    [rec] = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert rec["captions"][0] == "a dog" and len(rec["captions"][1]) <= 300


BAD = [
    ("missing.jsonl", None, "jsonl", r"missing\.jsonl: no such file"),
    ("bad.json", b'{"images": [', "coco", r"bad\.json: invalid JSON at line 1 column 13"),
    ("ok.json", b"[]", "xml", r"unknown format 'xml' \(choose coco, vg, albef, jsonl\)"),
    ("nofield.jsonl", b'{"image": "a", "captions": ["a dog"]}\n{"image": "b"}\n', "jsonl", r"nofield\.jsonl: line 2: missing field 'captions'"),
    ("nostr.json", b'[{"image": "a", "caption": ["ok", {"t": 1}]}]', "albef", r"nostr\.json: \[0\] caption 1: caption must be a string, got dict"),
    ("latin1.jsonl", b'{"image": "a", "captions": ["caf\xe9"]}\n', "jsonl", r"latin1\.jsonl: line 1: invalid UTF-8 at byte 32"),
    ("vg.json", b'[{"id": 3, "regions": [{"image_id": 3}]}]', "vg", r"vg\.json: \[0\]\.regions\[0\]: missing field 'phrase'"),
]


@pytest.mark.parametrize("name, content, fmt, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_keeps_old_output(tmp_path, name, content, fmt, message):
    src = tmp_path / name
    if content is not None:
        src.write_bytes(content)
    out = tmp_path / "out.jsonl"
    out.write_text("previous run\n")
    res = run(src, "--format", fmt, "--out", out, "--no-cache")
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.startswith("hist-vlm parse: error:")]
    assert len(lines) == 1 and re.search(message, lines[0]), res.stderr
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    assert out.read_text() == "previous run\n"  # atomic: the old file is untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no temp left behind


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give INPUT"),
        (["x.jsonl", "--out", "o.jsonl"], "give --format"),
        (["x.jsonl", "--format", "jsonl"], "give --out"),
        (["--parser", "llm", "--text", "a dog"], "--parser llm needs --llm-url and --llm-model"),
        (["--parser", "gpt", "--text", "a dog"], "unknown parser 'gpt'"),
        (["--sample", "--no-cache", "--cache-dir", "d"], "either --cache-dir or --no-cache"),
    ],
)
def test_usage_mistakes_are_one_line(tmp_path, monkeypatch, args, message):
    (tmp_path / "x.jsonl").write_text('{"image": "a", "captions": ["a dog"]}\n')
    monkeypatch.chdir(tmp_path)
    res = run(*args)
    assert res.exit_code == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output


def test_unwritable_output_is_one_line(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"image": "a", "captions": ["a dog"]}\n')
    res = run(src, "--format", "jsonl", "--out", tmp_path / "no" / "dir" / "o.jsonl", "--no-cache")
    assert res.exit_code == 2 and "cannot write" in res.stderr and "Traceback" not in res.output


def test_two_spacy_workers_give_the_same_output(tmp_path):
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}.jsonl"
        res = run("--sample", "--out", out, "--workers", workers, "--no-cache")
        assert res.exit_code == 0, res.output
        outs.append(out.read_text())
    assert outs[0] == outs[1] and outs[0].count("\n") == 20


def cached(cache_dir) -> int:
    if not (cache_dir / CACHE_FILE).exists():
        return 0
    with ParseCache(cache_dir) as cache:
        return cache.count("spacy", SpacyParser.version)


def test_ctrl_c_leaves_no_output_and_the_rerun_resumes(tmp_path):
    """A real SIGINT to a running `hist-vlm parse`: exit 130, old output kept, cache kept."""
    src = tmp_path / "big.jsonl"
    with src.open("w") as f:
        for k in range(200):
            caps = [f"a man number {k} holds umbrella {m} beside a white horse {k * 5 + m}" for m in range(5)]
            f.write(json.dumps({"image": f"{k}.jpg", "captions": caps}) + "\n")
    out, cache = tmp_path / "out.jsonl", tmp_path / "cache"
    out.write_text("previous run\n")
    cmd = [sys.executable, "-c", "from hist_vlm.cli import main; main()", "parse", str(src), "--format", "jsonl",
           "--out", str(out), "--cache-dir", str(cache), "--batch-size", "32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and cached(cache) < 64:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"interrupted: {out} not written; re-run to resume from the cache" in err and "Traceback" not in err
    assert out.read_text() == "previous run\n" and not list(tmp_path.glob(".out.jsonl*"))
    kept = cached(cache)
    assert 64 <= kept < 1000
    res = run(src, "--format", "jsonl", "--out", out, "--cache-dir", cache)
    assert res.exit_code == 0 and f"cache: {kept} hits, {1000 - kept} parsed" in res.stdout
