"""LLM caption parser, as in the paper (Vicuna prompted with in-context examples, following
SelfEQ), for any OpenAI-compatible chat-completions endpoint: vLLM, llama.cpp server, Ollama.

One request per caption asks for the noun phrases AND their subjects in JSON (the paper asks
for the subject of each phrase in a second round; one round costs a caption one request
instead of 1 + #phrases). Every answer is checked: valid JSON of the expected shape, each
phrase a substring of its caption (case-insensitive; offsets are taken from the caption), each
subject a word inside its phrase. A bad answer is retried, then the caption falls back to the
spaCy parser; every rejection is counted by reason in `stats`. HTTP is standard-library urllib.
Never imports torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from hist_vlm.text.types import CaptionParser, Phrase

__all__ = ["API_KEY_ENV", "LLMConfig", "LLMError", "LLMParser", "LLMStats", "BadAnswer", "phrases_from_answer"]

API_KEY_ENV = "HIST_VLM_LLM_API_KEY"

SYSTEM_PROMPT = (
    "You split image captions into object-centric noun phrases. For each noun phrase that names "
    "something visible, copy it exactly as it is written in the caption, give its subject (the "
    "head noun, copied exactly from the phrase) and the subject's lemma (singular, lower case). "
    "Leave out pronouns. Answer with JSON only, in the form "
    '{"phrases": [{"phrase": ..., "subject": ..., "lemma": ...}]}.'
)

# In-context examples (user caption, assistant answer), written for this project.
FEW_SHOT: tuple[tuple[str, dict], ...] = (
    (
        "A man in a blue hard hat stands next to two brown dogs.",
        {
            "phrases": [
                {"phrase": "A man", "subject": "man", "lemma": "man"},
                {"phrase": "a blue hard hat", "subject": "hat", "lemma": "hat"},
                {"phrase": "two brown dogs", "subject": "dogs", "lemma": "dog"},
            ]
        },
    ),
    (
        "a group of children playing soccer on a grassy field",
        {
            "phrases": [
                {"phrase": "a group of children", "subject": "children", "lemma": "child"},
                {"phrase": "soccer", "subject": "soccer", "lemma": "soccer"},
                {"phrase": "a grassy field", "subject": "field", "lemma": "field"},
            ]
        },
    ),
    (
        "Two giraffes eat leaves from the top of a tall tree while she watches them.",
        {
            "phrases": [
                {"phrase": "Two giraffes", "subject": "giraffes", "lemma": "giraffe"},
                {"phrase": "leaves", "subject": "leaves", "lemma": "leaf"},
                {"phrase": "the top of a tall tree", "subject": "tree", "lemma": "tree"},
            ]
        },
    ),
)


@dataclass
class LLMConfig:
    """Where and how to ask. `base_url` is the API root, e.g. http://127.0.0.1:8000/v1
    (`/chat/completions` is appended unless already there)."""

    base_url: str
    model: str
    api_key_env: str = API_KEY_ENV  # read at request time; no key -> no Authorization header
    timeout_s: float = 60.0
    retries: int = 2  # extra attempts after a bad answer or a transient HTTP failure
    concurrency: int = 4  # requests in flight at once
    temperature: float = 0.0
    max_tokens: int = 512

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"


class LLMError(RuntimeError):
    """The endpoint cannot be used at all (unreachable, wrong model, bad key)."""


class BadAnswer(ValueError):
    """An answer that fails validation; `reason` is the key counted in `LLMStats.rejected`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class LLMStats:
    """Thread-safe counters: requests sent, answers accepted, rejections by reason, and
    captions that fell back to the fallback parser (or got no phrases without one)."""

    requests: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)
    fallbacks: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, reason: str | None = None) -> None:
        with self._lock:
            if name == "rejected":
                self.rejected[reason] += 1
            else:
                setattr(self, name, getattr(self, name) + 1)

    def summary(self) -> str:
        why = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "none"
        return (
            f"{self.requests} requests, {self.accepted} answers accepted, "
            f"{sum(self.rejected.values())} rejected ({why}), {self.fallbacks} captions fell back"
        )


def _extract_json(content: str):
    """The JSON value in a chat answer, tolerating ``` fences and chatter around it."""
    text = content.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    if fenced:
        text = fenced.group(1).strip()
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if not starts:
        raise BadAnswer("not_json", "no JSON in the answer")
    try:
        value, _ = json.JSONDecoder().raw_decode(text[min(starts) :])
    except json.JSONDecodeError as e:
        raise BadAnswer("not_json", e.msg) from None
    return value


def _word_span(haystack: str, needle: str, last: bool) -> tuple[int, int] | None:
    """Case-insensitive span of `needle` in `haystack` at word boundaries."""
    matches = list(re.finditer(rf"(?<!\w){re.escape(needle)}(?!\w)", haystack, re.I))
    if not matches:
        return None
    m = matches[-1] if last else matches[0]
    return m.start(), m.end()


def phrases_from_answer(caption: str, content: str) -> list[Phrase]:
    """Validate one chat answer and turn it into phrases with offsets into `caption`.
    Raises `BadAnswer` on anything that does not fit; never guesses."""
    value = _extract_json(content)
    items = value.get("phrases") if isinstance(value, dict) else value
    if not isinstance(items, list):
        raise BadAnswer("bad_schema", "expected a list of phrases")
    out: list[Phrase] = []
    seen: set[tuple[int, int]] = set()
    cursor = 0
    for item in items:
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) and item[k].strip() for k in ("phrase", "subject")):
            raise BadAnswer("bad_schema", "each phrase needs string 'phrase' and 'subject'")
        text, subject = item["phrase"].strip(), item["subject"].strip()
        # prefer the occurrence after the previous phrase, so repeated phrases map in order
        span = _word_span(caption[cursor:], text, last=False)
        span = (span[0] + cursor, span[1] + cursor) if span else _word_span(caption, text, last=False)
        if span is None:
            raise BadAnswer("phrase_not_in_caption", text)
        start, end = span
        sub = _word_span(caption[start:end], subject, last=True)
        if sub is None:
            raise BadAnswer("subject_not_in_phrase", f"{subject!r} in {text!r}")
        if (start, end) in seen:
            continue
        seen.add((start, end))
        cursor = end
        lemma = item.get("lemma")
        lemma = lemma.strip().lower() if isinstance(lemma, str) and lemma.strip() else subject.lower()
        out.append(
            Phrase(
                text=caption[start:end],
                start=start,
                end=end,
                subject=caption[start + sub[0] : start + sub[1]],
                subject_start=start + sub[0],
                subject_end=start + sub[1],
                subject_lemma=lemma,
            )
        )
    return sorted(out, key=lambda p: (p.start, p.end))


def _messages(caption: str) -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}]
    for example, answer in FEW_SHOT:
        msgs.append({"role": "user", "content": example})
        msgs.append({"role": "assistant", "content": json.dumps(answer)})
    msgs.append({"role": "user", "content": caption})
    return msgs


# Changes whenever the prompt does, so cached parses of an older prompt are not reused.
PROMPT_HASH = hashlib.sha256(json.dumps([SYSTEM_PROMPT, FEW_SHOT]).encode()).hexdigest()[:8]


class LLMParser:
    """Caption parser backed by a chat-completions endpoint; name "llm:<model>"."""

    def __init__(self, config: LLMConfig, fallback: CaptionParser | None = None):
        self.config = config
        self.fallback = fallback
        self.name = f"llm:{config.model}"
        fb = f"{fallback.name}-{fallback.version}" if fallback is not None else "none"
        self.version = f"p{PROMPT_HASH}+{fb}"
        self.stats = LLMStats()
        self._fallback_lock = threading.Lock()  # spaCy pipelines are not shared across threads

    def parse(self, caption: str) -> list[Phrase]:
        for _ in range(1 + self.config.retries):
            try:
                content = self._ask(caption)
                phrases = phrases_from_answer(caption, content)
            except BadAnswer as e:
                self.stats.add("rejected", e.reason)
                continue
            self.stats.add("accepted")
            return phrases
        self.stats.add("fallbacks")
        if self.fallback is None:
            return []
        with self._fallback_lock:
            return self.fallback.parse(caption)

    def parse_many(self, captions: Iterable[str], batch_size: int = 256) -> Iterator[list[Phrase]]:
        """Up to `concurrency` requests in flight; results in input order; reads `captions`
        lazily (a bounded window ahead), so it streams."""
        window = max(2 * self.config.concurrency, 1)
        with ThreadPoolExecutor(self.config.concurrency) as pool:
            pending: deque = deque()
            try:
                for caption in captions:
                    pending.append(pool.submit(self.parse, caption))
                    if len(pending) >= window:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:  # on an error or an abandoned stream, do not send the queued requests
                for future in pending:
                    future.cancel()

    def _ask(self, caption: str) -> str:
        """One chat completion; transient failures (timeouts, 429, 5xx) count as a rejection
        ("http_error") and are retried by `parse`; an unusable endpoint raises LLMError."""
        body = json.dumps(
            {
                "model": self.config.model,
                "messages": _messages(caption),
                "temperature": self.config.temperature,
                "max_tokens": self.config.max_tokens,
            }
        ).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.config.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.config.url, data=body, headers=headers, method="POST")
        self.stats.add("requests")
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            if e.code == 429 or e.code >= 500:
                time.sleep(min(0.2, self.config.timeout_s))
                raise BadAnswer("http_error", f"HTTP {e.code}") from None
            raise LLMError(f"{self.config.url} answered HTTP {e.code} {e.reason} (check --llm-model and the API key)") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError):
                raise BadAnswer("timeout", str(reason)) from None
            raise LLMError(f"cannot reach the LLM at {self.config.url}: {reason}") from None
        try:
            return json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise BadAnswer("bad_response", "not a chat-completions response") from None
