"""Parse cache: keyed storage, near-instant re-parse, and resume after an interrupted run."""
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hist_vlm.data.captions import read_captions
from hist_vlm.text.cache import CACHE_FILE, CachedParser, ParseCache, default_cache_dir
from hist_vlm.text.corpus import atomic_write_jsonl, parse_images
from hist_vlm.text.spacy_parser import SpacyParser
from hist_vlm.text.types import Phrase

SAMPLE = Path(__file__).resolve().parents[1] / "src/hist_vlm/data/sample_captions.jsonl"


class Counting:
    """A real parser behind a counter; raises after `fail_after` captions when given."""

    def __init__(self, parser, fail_after: int | None = None):
        self.parser, self.fail_after, self.parsed = parser, fail_after, []
        self.name, self.version = parser.name, parser.version

    def parse(self, caption):
        return next(self.parse_many([caption]))

    def parse_many(self, captions, batch_size=256):
        captions = list(captions)
        for caption, phrases in zip(captions, self.parser.parse_many(captions, batch_size)):
            if self.fail_after is not None and len(self.parsed) == self.fail_after:
                raise RuntimeError("injected failure")
            self.parsed.append(caption)
            yield phrases


@pytest.fixture(scope="module")
def spacy():
    return SpacyParser()


def test_store_and_lookup_by_name_version_caption(tmp_path):
    p = Phrase("a dog", 0, 5, "dog", 2, 5, "dog")
    with ParseCache(tmp_path) as cache:
        cache.put_many("spacy", "1", [("a dog", [p]), ("nothing here", [])])
        cache.put_many("spacy", "1", [("a dog", [p])])  # replaced, not duplicated
        assert cache.count("spacy", "1") == 2
        assert cache.get_many("spacy", "1", ["a dog", "nothing here", "new"]) == {"a dog": [p], "nothing here": []}
        assert cache.get_many("spacy", "2", ["a dog"]) == {}
        assert cache.get_many("llm:x", "1", ["a dog"]) == {}
    assert (tmp_path / CACHE_FILE).is_file()
    with ParseCache(tmp_path) as again:  # persistent
        assert again.get_many("spacy", "1", ["a dog"]) == {"a dog": [p]}
        assert again._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_default_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HIST_VLM_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("HIST_VLM_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "hist-vlm"


def test_second_pass_parses_nothing(tmp_path, spacy):
    captions = ["a dog on a bed", "two cats", "a dog on a bed", "a man with a hat"]
    with ParseCache(tmp_path) as cache:
        first = Counting(spacy)
        out1 = list(CachedParser(first, cache).parse_many(captions, batch_size=3))
        assert first.parsed == ["a dog on a bed", "two cats", "a man with a hat"]  # repeats parsed once
        second = Counting(spacy)
        cached = CachedParser(second, cache)
        assert list(cached.parse_many(captions)) == out1 == list(spacy.parse_many(captions))
        assert second.parsed == [] and (cached.hits, cached.misses) == (4, 0)


def run_job(parser, out, seed=0):
    images = read_captions(SAMPLE, "jsonl")
    atomic_write_jsonl(out, parse_images(images, parser, seed=seed, batch_size=16))


def test_interrupted_run_resumes_without_loss_or_duplicates(tmp_path, spacy):
    reference = tmp_path / "reference.jsonl"
    run_job(spacy, reference)  # uninterrupted, no cache
    out = tmp_path / "out.jsonl"
    with ParseCache(tmp_path / "cache") as cache:
        failing = Counting(spacy, fail_after=37)
        with pytest.raises(RuntimeError, match="injected"):
            run_job(CachedParser(failing, cache, commit_every=10), out)
        assert not out.exists() and not list(tmp_path.glob(".out.jsonl*"))  # no half-written output
        assert cache.count("spacy", spacy.version) == 37  # everything parsed before the failure was kept
        rerun = Counting(spacy)
        run_job(CachedParser(rerun, cache, commit_every=10), out)
        assert len(rerun.parsed) == 100 - 37 and not set(rerun.parsed) & set(failing.parsed)
        assert cache.count("spacy", spacy.version) == 100
    assert out.read_text() == reference.read_text()


def test_killed_process_resumes(tmp_path, spacy):
    """A real `hist-vlm parse` killed with SIGKILL mid-run; the re-run parses only the rest."""
    corpus = tmp_path / "big.jsonl"
    with corpus.open("w") as f:
        for k in range(200):
            caps = [f"a dog number {k} chases ball {m} near a red car {k * 5 + m}" for m in range(5)]
            f.write(json.dumps({"image": f"{k}.jpg", "captions": caps}) + "\n")
    cache_dir, out = tmp_path / "cache", tmp_path / "out.jsonl"
    cli = [sys.executable, "-c", "from hist_vlm.cli import main; main()", "parse", str(corpus), "--format", "jsonl"]
    cmd = [*cli, "--out", str(out), "--cache-dir", str(cache_dir), "--batch-size", "32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done_before_kill = 0
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if (cache_dir / CACHE_FILE).exists():
            with ParseCache(cache_dir) as c:
                done_before_kill = c.count("spacy", SpacyParser.version)
            if done_before_kill >= 100:
                break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not out.exists()
    with ParseCache(cache_dir) as c:
        kept = c.count("spacy", SpacyParser.version)
    assert 100 <= kept < 1000
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    hits, parsed = map(int, re.search(r"cache: (\d+) hits, (\d+) parsed", rerun.stdout).groups())
    assert (hits, parsed) == (kept, 1000 - kept)
    fresh = tmp_path / "fresh.jsonl"
    atomic_write_jsonl(fresh, parse_images(read_captions(corpus, "jsonl"), spacy))  # uninterrupted, no cache
    assert out.read_text() == fresh.read_text()
