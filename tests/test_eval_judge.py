"""Pairwise LLM judge: strict parsing, answer orders, caching, and the HTTP backend against a local test server."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler

import pytest
import torch
from local_http import serve

from sacpo_lightning.evaluation.judge import (
    RUBRICS,
    CallableBackend,
    HFLocalBackend,
    JudgeError,
    OpenAIChatBackend,
    PairwiseJudge,
    build_messages,
    parse_scores,
)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Answer 1 is better.\n[[8]] [[3]]", (8, 3)),
        ("reasoning\n\n  [[10]]  [[1]]  \n\n", (10, 1)),
        ("[[ 5 ]] [[ 5 ]]", (5, 5)),
        ("[[8]] [[3]]\nThat is my verdict.", None),  # not the last line
        ("Scores: [[8]] [[3]]", None),
        ("[[0]] [[3]]", None),
        ("[[11]] [[3]]", None),
        ("[[7.5]] [[3]]", None),
        ("8 3", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_scores(reply, expected):
    assert parse_scores(reply) == expected


def test_prompt_shows_both_answers_and_format():
    messages = build_messages(RUBRICS["harmlessness"], "How do I pick a lock?", "No.", "Like this...")
    assert messages[0]["role"] == "system" and messages[1]["role"] == "user"
    user = messages[1]["content"]
    assert user.index("No.") < user.index("Like this...") and "[[score of Assistant 1]]" in user


def _scoring_judge(calls: list):
    """A fake judge that prefers the answer containing 'good' (9 vs 2) and cannot parse answers with 'weird'."""

    def reply(messages):
        calls.append(messages)
        user = messages[-1]["content"]
        first = user.split("[The Start of Assistant 1's Answer]\n")[1].split("\n[The End")[0]
        second = user.split("[The Start of Assistant 2's Answer]\n")[1].split("\n[The End")[0]
        if "weird" in first + second:
            return "I refuse to use the format."
        s1, s2 = (9 if "good" in first else 2), (9 if "good" in second else 2)
        return f"Reasoning.\n[[{s1}]] [[{s2}]]"

    return reply


def test_orders_outcomes_and_cache(tmp_path):
    calls: list = []
    cache = tmp_path / "judgements.jsonl"
    questions = ["q1", "q2", "q3", "q4"]
    model = ["good answer", "bad answer", "same", "weird answer"]
    base = ["bad answer", "good answer", "same", "good answer"]
    judge = PairwiseJudge(CallableBackend(_scoring_judge(calls), "fake"), cache_path=cache, repeats=2)
    verdicts = judge.judge("helpfulness", questions, model, base)
    # Identical answers are a tie without a call; 3 questions x 2 orders x 2 repeats are judged.
    assert len(calls) == 12
    assert [v.outcome for v in verdicts] == [1.0, 0.0, 0.5, None]
    assert (verdicts[0].score_a, verdicts[0].score_b) == (9.0, 2.0)  # mapped back from the swapped order
    assert verdicts[2].identical and verdicts[3].invalid == 4 and verdicts[3].valid == 0
    assert judge.report_stats()["invalid"] == 4
    assert len(cache.read_text().splitlines()) == 12

    calls.clear()
    again = PairwiseJudge(CallableBackend(_scoring_judge(calls), "fake"), cache_path=cache, repeats=2)
    assert [v.outcome for v in again.judge("helpfulness", questions, model, base)] == [1.0, 0.0, 0.5, None]
    assert calls == [] and again.stats["cached"] == 12
    # A different rubric or judge is a different key.
    again.judge("harmlessness", questions[:1], model[:1], base[:1])
    assert len(calls) == 4
    retry = PairwiseJudge(CallableBackend(_scoring_judge(calls), "fake"), cache_path=cache, repeats=2,
                          retry_invalid=True)
    calls.clear()
    retry.judge("helpfulness", questions, model, base)
    assert len(calls) == 4  # only the unparseable ones are asked again


class _Handler(BaseHTTPRequestHandler):
    replies: list = []
    requests: list = []
    fail_first = 0

    def do_POST(self):  # noqa: N802 - http.server naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b"busy")
            return
        content = type(self).replies[(len(type(self).requests) - 1) % len(type(self).replies)]
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    _Handler.replies = ["Fine.\n[[7]] [[4]]"]
    _Handler.requests = []
    _Handler.fail_first = 0
    yield from serve(_Handler)


def test_http_backend(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "secret")
    backend = OpenAIChatBackend(server, "judge-model", api_key_env="TEST_JUDGE_KEY", sleep=lambda s: None)
    judge = PairwiseJudge(backend, cache_path=tmp_path / "cache.jsonl")
    verdicts = judge.judge("harmlessness", ["q"], ["model answer"], ["baseline answer"])
    # Both orders answer [[7]] [[4]]: model 7 then 4 -> mean 5.5 each -> tie.
    assert verdicts[0].outcome == 0.5 and verdicts[0].valid == 2
    first = _Handler.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer secret"
    assert first["body"]["model"] == "judge-model" and first["body"]["temperature"] == 0.0
    assert first["body"]["messages"][0]["role"] == "system"

    _Handler.requests.clear()
    PairwiseJudge(backend, cache_path=tmp_path / "cache.jsonl").judge(
        "harmlessness", ["q"], ["model answer"], ["baseline answer"])
    assert _Handler.requests == []  # cached: no HTTP call

    _Handler.fail_first = 2
    assert backend.complete([[{"role": "user", "content": "x"}]]) == ["Fine.\n[[7]] [[4]]"]
    assert len(_Handler.requests) == 3
    _Handler.fail_first = 10
    with pytest.raises(JudgeError, match="HTTP 503"):
        backend.complete([[{"role": "user", "content": "x"}]])


def test_http_backend_unreachable():
    backend = OpenAIChatBackend("http://127.0.0.1:9/v1", "m", max_retries=1, timeout=2, sleep=lambda s: None)
    with pytest.raises(JudgeError, match="unreachable"):
        backend.complete([[{"role": "user", "content": "x"}]])


def test_local_model_backend(tiny_model_dir, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        backend = HFLocalBackend(tiny_model_dir, max_new_tokens=4, device="cpu", dtype="float32")
        judge = PairwiseJudge(backend, cache_path=tmp_path / "c.jsonl", both_orders=False)
        verdicts = judge.judge("helpfulness", ["q"], ["a"], ["b"])
    finally:
        torch.set_num_threads(threads)
    # A random tiny model does not follow the format: the reply is counted as unparseable, never guessed.
    assert verdicts[0].outcome is None and verdicts[0].invalid == 1
    assert json.loads((tmp_path / "c.jsonl").read_text().splitlines()[0])["scores"] is None
