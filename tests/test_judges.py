"""Judges against a real misbehaving HTTP server on 127.0.0.1 (tests/judge_server.py): a timeout, a 5xx,
a dropped connection or a reply that does not parse ends as ``error``/``unknown`` and is counted, never
as a verdict; an interrupted evaluation resumes without regenerating or re-judging what was done; the API
key never reaches a file."""

from __future__ import annotations

import itertools
import json
import threading

import pytest
from rich.console import Console

from fedalign.errors import FedalignError
from fedalign.evaluation.judges import (
    CachedJudge,
    JudgeRequest,
    JudgeSettings,
    OpenAIJudge,
    judge_all,
    make_judge,
)
from fedalign.evaluation.safety.common import parse_settings
from fedalign.evaluation.safety.runner import evaluate
from tests.judge_server import JudgeServer

QUIET = Console(quiet=True)
REQUEST = JudgeRequest("Is this answer safe? Answer: I cannot help.", max_tokens=8)


def _judge(url: str, tmp_path, **options) -> CachedJudge:
    inner = OpenAIJudge("judge-model", url, timeout=options.pop("timeout", 0.5), backoff=0.0, **options)
    return CachedJudge(inner, tmp_path / "judgments.jsonl")


@pytest.mark.parametrize("behaviour", ["500", "timeout", "drop", "garbage"])
def test_transport_failures_are_errors_and_are_not_cached(behaviour, tmp_path):
    with JudgeServer(behaviour, delay=2.0) as server:
        judge = _judge(server.url, tmp_path, max_retries=1)
        reply = judge(REQUEST)
    assert reply.status == "error" and reply.text is None and reply.error
    retried = behaviour in ("500", "timeout", "drop")
    assert len(server.requests) == (2 if retried else 1)  # 5xx, timeouts and drops are retried once
    assert not (tmp_path / "judgments.jsonl").exists()


def test_a_4xx_is_not_retried_and_a_verdict_is_cached_with_the_model_the_server_named(tmp_path):
    with JudgeServer("ok:unsafe") as server:
        judge = _judge(server.url, tmp_path, max_retries=3)
        first, again = judge(REQUEST), judge(REQUEST)
    assert (first.text, first.model, first.cached) == ("unsafe", "judge-model-2026-11-01", False)
    assert (again.text, again.cached) == ("unsafe", True) and len(server.requests) == 1
    body = server.requests[0]["body"]
    assert (body["temperature"], body["max_tokens"], body["seed"]) == (0.0, 8, 0)
    replay = make_judge(
        "replay:openai:judge-model@" + server.url, tmp_path / "judgments.jsonl", JudgeSettings()
    )
    assert replay(REQUEST).text == "unsafe"
    with pytest.raises(FedalignError, match="no verdict"):
        replay(JudgeRequest("another prompt"))


def test_images_travel_as_data_urls(tmp_path):
    png = b"\x89PNG\r\n\x1a\nfake"
    with JudgeServer("ok:[Safety Judgement:] True") as server:
        _judge(server.url, tmp_path)(JudgeRequest("look", (png,)))
    content = server.requests[0]["body"]["messages"][0]["content"]
    assert content[0] == {"type": "text", "text": "look"}
    assert content[1]["image_url"]["url"].startswith("data:image/png;base64,")


def test_concurrency_is_bounded(tmp_path):
    active, peak, lock = [0], [0], threading.Lock()

    def behaviour(_body):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        import time

        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return "ok:safe"

    requests = [JudgeRequest(f"prompt {i}") for i in range(12)]
    with JudgeServer(behaviour) as server:
        replies = judge_all(requests, _judge(server.url, tmp_path), 3, QUIET)
    assert [r.text for r in replies] == ["safe"] * 12 and 1 < peak[0] <= 3


def test_an_openai_key_is_never_sent_to_another_server_unless_named(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-SECRET")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # never consulted
    with JudgeServer("ok:safe") as server:
        _judge(server.url, tmp_path)(REQUEST)
    assert "SECRET" not in bearer(server)
    judge = make_judge("openai:gpt-4", tmp_path / "j.jsonl", JudgeSettings())
    assert judge.describe()["base_url"] == "https://api.openai.com/v1" and judge.judge_id == "openai:gpt-4"
    with pytest.raises(FedalignError, match="not an http"):
        make_judge("openai:m@http://[::1", tmp_path / "j.jsonl", JudgeSettings())
    with pytest.raises(FedalignError, match="not an http"):
        make_judge("openai:m@not a url", tmp_path / "j.jsonl", JudgeSettings())


def test_an_error_message_never_carries_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-live-abcdef123456")

    def unauthorised(_body):
        return "401"

    with JudgeServer(unauthorised) as server:
        inner = OpenAIJudge("m", server.url, api_key_env="JUDGE_KEY", timeout=1, backoff=0)
        reply = inner(REQUEST)
    assert reply.status == "error" and "HTTP 401" in reply.error
    assert "abcdef123456" not in reply.error and "sk-live" not in reply.error


def test_a_missing_key_for_openai_itself_is_one_clear_line(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(FedalignError, match="set OPENAI_API_KEY in the environment"):
        make_judge("openai:gpt-4o", None, JudgeSettings())  # type: ignore[arg-type]
    with pytest.raises(FedalignError, match="is not a judge"):
        make_judge("gpt-4o", None, JudgeSettings())  # type: ignore[arg-type]


def _mmsb(tmp_path, judge: str, *extra: str):
    settings = parse_settings(
        [
            f"out={tmp_path / 'out'}",
            "limit=8",
            "max_new_tokens=6",
            "batch_size=8",
            "judge.timeout=0.5",
            "judge.max_retries=1",
            "judge.backoff=0",
            *extra,
        ]
    )
    return evaluate("mm-safetybench", "data/tiny-llava", None, judge, settings, QUIET)


def test_a_faulty_judge_gives_errors_and_unknowns_never_verdicts_and_a_rerun_only_asks_again(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("JUDGE_KEY", "sk-test-SECRET-key-123")
    faults = itertools.cycle(["500", "timeout", "drop", "ok:I cannot tell.", "garbage", "ok:maybe safe-ish?"])
    with JudgeServer(lambda _b: next(faults), delay=2.0) as server:
        # one at a time and no retry, so the eight answers meet the faults in order
        metrics = _mmsb(
            tmp_path,
            f"openai:judge-model@{server.url}",
            "mode=faithful",
            "judge.concurrency=1",
            "judge.max_retries=0",
            "image_types=[SD]",
            "limit=12",
            "judge.api_key_env=JUDGE_KEY",
        )
        asked_first = len(server.requests)
    result = metrics["checkpoints"][0]["metrics"]
    assert result["safe_count"] == result["unsafe_count"] == 0  # nothing became a verdict
    assert result["error_count"] + result["unknown_count"] == result["n"] == 12
    assert result["error_count"] >= 4 and result["unknown_count"] >= 1
    assert (metrics["errors"], metrics["unknown"]) == (result["error_count"], result["unknown_count"])
    out = tmp_path / "out" / "mm-safetybench"
    (written,) = out.glob("openai_judge-model-*-faithful/samples.jsonl")
    records = [json.loads(line) for line in written.open()]
    reasons = " ".join(r["judge_error"] or "" for r in records)
    for reason in ("HTTP 500", "APITimeoutError", "APIConnectionError", "JSONDecodeError"):
        assert reason in reasons  # every fault is named in the per-sample record
    assert all(r["label"] == "error" for r in records if r["judge_error"])
    assert metrics["judge"]["errors"] == result["error_count"] and metrics["judge"]["first_errors"]
    assert bearer(server) == "Bearer sk-test-SECRET-key-123"
    generated = (out / "responses.jsonl").read_text()

    with JudgeServer("ok:unsafe") as healthy:
        again = _mmsb(
            tmp_path, f"openai:judge-model@{healthy.url}", "mode=faithful", "image_types=[SD]", "limit=12"
        )
        # the judge id names the URL, so a new server is a new judge: every distinct answer is asked once
        assert 1 <= len(healthy.requests) <= 12
    assert again["checkpoints"][0]["metrics"]["unsafe_count"] == 12
    assert (out / "responses.jsonl").read_text() == generated  # nothing regenerated
    assert asked_first <= 12  # identical answers share one verdict
    for file in out.rglob("*"):
        if file.is_file():
            assert "SECRET" not in file.read_text(errors="replace"), file


def bearer(server: JudgeServer) -> str:
    headers = {k.lower(): v for k, v in server.requests[0]["headers"].items()}
    return headers["authorization"]


def test_an_interrupted_evaluation_resumes_without_rejudging_or_regenerating(tmp_path):
    failing: set[str] = set()

    def flaky(body):  # the first three distinct prompts fail (every attempt), the rest are judged
        prompt = body["messages"][-1]["content"]
        if len(failing) < 3:
            failing.add(prompt)
        return "500" if prompt in failing and fail[0] else "ok:safe"

    fail = [True]
    with JudgeServer(flaky) as server:
        spec = f"openai:judge-model@{server.url}"
        first = _mmsb(tmp_path, spec)
        errors = first["checkpoints"][0]["metrics"]["error_count"]
        assert errors >= 3 and first["errors"] == errors
        fail[0] = False
        before = len(server.requests)
        second = _mmsb(tmp_path, spec)
        asked = [r["body"]["messages"][-1]["content"] for r in server.requests[before:]]
        assert sorted(asked) == sorted(failing)  # only what failed is asked again, once each
        assert second["checkpoints"][0]["metrics"]["safe_count"] == 8 and second["errors"] == 0
        before = len(server.requests)
        third = _mmsb(tmp_path, spec)
        assert len(server.requests) == before  # all cached
    assert third["checkpoints"][0]["metrics"] == second["checkpoints"][0]["metrics"]
    replay = _mmsb(tmp_path, f"replay:openai:judge-model@{server.url}")  # offline, from the cache
    assert replay["checkpoints"][0]["metrics"] == second["checkpoints"][0]["metrics"]
    lines = (tmp_path / "out" / "mm-safetybench" / "responses.jsonl").read_text().splitlines()
    assert len(lines) == 8 and len({json.loads(line)["key"] for line in lines}) == 8  # generated once


def test_an_interrupted_generation_resumes_where_it_stopped(tmp_path):
    from evaluators.refusal.keywords import GCG_PREFIXES

    assert GCG_PREFIXES
    _mmsb(tmp_path, "keyword")
    cache = tmp_path / "out" / "mm-safetybench" / "responses.jsonl"
    lines = cache.read_text().splitlines(keepends=True)
    cache.write_text("".join(lines[:5]) + lines[5][:20])  # killed while writing the sixth answer
    again = _mmsb(tmp_path, "keyword")
    resumed = cache.read_text().splitlines(keepends=True)
    assert resumed[:5] == lines[:5] and len(resumed) == 8  # the torn line dropped, three generated
    assert again["checkpoints"][0]["metrics"]["n"] == 8
