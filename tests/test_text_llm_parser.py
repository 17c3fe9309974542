"""LLM parser against a real OpenAI-compatible HTTP server on 127.0.0.1 that answers good,
bad and malformed outputs."""
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from hist_vlm.cli import app
from hist_vlm.text.llm_parser import FEW_SHOT, LLMConfig, LLMError, LLMParser
from hist_vlm.text.spacy_parser import SpacyParser


def answer(*items, fenced=False) -> str:
    body = json.dumps({"phrases": [dict(zip(("phrase", "subject", "lemma"), it)) for it in items]})
    return f"Sure! Here you go:\n```json\n{body}\n```" if fenced else body


class FakeLLM:
    """Chat-completions server. `script[caption]` is the list of answers given on successive
    requests (the last one repeats): a string is the message content, an int an HTTP status."""

    def __init__(self):
        self.script: dict[str, list] = {}
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                caption = body["messages"][-1]["content"]
                queue = fake.script.get(caption, [404])
                reply = queue.pop(0) if len(queue) > 1 else queue[0]
                if isinstance(reply, int):
                    self.send_response(reply)
                    self.end_headers()
                    return
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def llm():
    server = FakeLLM()
    yield server
    server.close()


@pytest.fixture(scope="module")
def spacy():
    return SpacyParser()


def make(llm, fallback=None, **kw) -> LLMParser:
    return LLMParser(LLMConfig(base_url=llm.url, model="vicuna-7b", **kw), fallback=fallback)


def test_good_answer_gives_phrases_with_offsets(llm, monkeypatch):
    monkeypatch.setenv("HIST_VLM_LLM_API_KEY", "sk-test")
    cap = "Two dogs chase a red frisbee in the park."
    llm.script[cap] = [answer(("two dogs", "Dogs", "dog"), ("a red frisbee", "frisbee", "frisbee"), ("the park", "park"), fenced=True)]
    parser = make(llm)
    phrases = parser.parse(cap)
    assert [(p.text, p.subject, p.subject_lemma) for p in phrases] == [
        ("Two dogs", "dogs", "dog"), ("a red frisbee", "frisbee", "frisbee"), ("the park", "park", "park")]
    for p in phrases:
        assert cap[p.start : p.end] == p.text and cap[p.subject_start : p.subject_end] == p.subject
    assert (parser.stats.requests, parser.stats.accepted, sum(parser.stats.rejected.values())) == (1, 1, 0)
    [req] = llm.requests
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    msgs = req["body"]["messages"]
    assert req["body"]["model"] == "vicuna-7b" and msgs[0]["role"] == "system"
    assert len(msgs) == 2 + 2 * len(FEW_SHOT) and msgs[1]["content"] == FEW_SHOT[0][0]
    assert parser.name == "llm:vicuna-7b"


def test_repeated_phrase_maps_to_successive_occurrences(llm):
    cap = "a dog next to a dog bed"
    llm.script[cap] = [answer(("a dog", "dog"), ("a dog bed", "bed"))]
    phrases = make(llm).parse(cap)
    assert [(p.start, p.end, p.subject_start) for p in phrases] == [(0, 5, 2), (14, 23, 20)]


@pytest.mark.parametrize(
    "bad, reason",
    [
        (answer(("a cat", "cat")), "phrase_not_in_caption"),
        (answer(("a dog", "frisbee")), "subject_not_in_phrase"),
        (answer(("a dog", "do")), "subject_not_in_phrase"),  # a subject must be a whole word
        ("I think the phrases are a dog and a frisbee.", "not_json"),
        ('{"phrases": [{"phrase": "a dog", "subject": ', "not_json"),
        ('{"phrases": [{"phrase": "a dog"}]}', "bad_schema"),
        ('{"phrases": "a dog"}', "bad_schema"),
        (503, "http_error"),
    ],
)
def test_bad_answer_is_rejected_then_retried(llm, bad, reason):
    cap = "a dog catches a frisbee"
    llm.script[cap] = [bad, answer(("a dog", "dog"), ("a frisbee", "frisbee"))]
    parser = make(llm, retries=2)
    assert [p.text for p in parser.parse(cap)] == ["a dog", "a frisbee"]
    assert parser.stats.rejected == {reason: 1}
    assert (parser.stats.requests, parser.stats.accepted, parser.stats.fallbacks) == (2, 1, 0)


def test_persistently_bad_output_falls_back_to_spacy(llm, spacy):
    cap = "a man riding a horse on the beach"
    llm.script[cap] = ["not json at all"]
    parser = make(llm, fallback=spacy, retries=2)
    assert parser.parse(cap) == spacy.parse(cap)
    assert parser.stats.rejected == {"not_json": 3} and parser.stats.fallbacks == 1 and len(llm.requests) == 3
    without = make(llm, retries=0)
    assert without.parse(cap) == [] and without.stats.fallbacks == 1
    assert parser.version != without.version  # fallback outputs are cached under their own key


def test_parse_many_keeps_order_with_concurrent_requests(llm):
    caps = [f"a dog and {n} cats" for n in range(12)]
    for n, cap in enumerate(caps):
        llm.script[cap] = ["garbage"] if n % 4 == 0 else [answer(("a dog", "dog"), (f"{n} cats", "cats", "cat"))]
    parser = make(llm, concurrency=4, retries=0)
    out = list(parser.parse_many(iter(caps)))
    assert [[p.text for p in ps] for ps in out] == [[] if n % 4 == 0 else ["a dog", f"{n} cats"] for n in range(12)]
    assert parser.stats.accepted == 9 and parser.stats.rejected == {"not_json": 3}


def test_unusable_endpoint_raises_a_clear_error(llm):
    llm.script["x"] = [401]
    with pytest.raises(LLMError, match="HTTP 401"):
        make(llm).parse("x")
    port = llm.server.server_port
    llm.close()
    with pytest.raises(LLMError, match=f"cannot reach the LLM at http://127.0.0.1:{port}/v1/chat/completions"):
        make(llm).parse("a dog")


def test_cli_summary_shows_llm_rejections(llm, tmp_path):
    captions = ["a dog on a sofa", "a cat near a window"]
    llm.script[captions[0]] = [answer(("a dog", "dog"), ("a sofa", "sofa"))]
    llm.script[captions[1]] = ["{broken"]
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"image": "1.jpg", "captions": captions}) + "\n")
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(app, ["parse", str(src), "--format", "jsonl", "--out", str(out), "--parser", "llm",
                                   "--llm-url", llm.url, "--llm-model", "vicuna-7b", "--workers", "2", "--no-cache"])
    assert res.exit_code == 0, res.output
    assert re.search(r"LLM: 4 requests, 1 answers accepted, 3 rejected \(not_json 3\), 1 captions fell back", res.stdout)
    [rec] = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["text"] for p in rec["phrases"]][:2] == ["a dog", "a sofa"]
    assert {p["caption_index"] for p in rec["phrases"]} == {0, 1}  # the second caption came from spaCy
    llm.close()
    res = CliRunner().invoke(app, ["parse", str(src), "--format", "jsonl", "--out", str(tmp_path / "o2.jsonl"),
                                   "--parser", "llm", "--llm-url", llm.url, "--llm-model", "m", "--no-cache"])
    assert res.exit_code == 2 and "cannot reach the LLM" in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "o2.jsonl").exists()
