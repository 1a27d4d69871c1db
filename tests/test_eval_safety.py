"""Every safety benchmark end to end on its synthetic fixture (data/safety) with the embedded tiny LLaVA and a
real PEFT adapter: once with the keyword proxy, once judged by a real OpenAI-compatible server
(``transformers serve`` on the embedded tiny LLaVA, started here on 127.0.0.1 and stopped by its PID).
The tiny judge answers nonsense, which is the point: its replies must end as ``unknown``, never as a
verdict, and every metrics file must say what judged it and what the numbers compare with."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from rich.console import Console

from fedalign.errors import FedalignError
from fedalign.evaluation.safety.common import finite, parse_settings
from fedalign.evaluation.safety.runner import BENCHMARKS, evaluate

from .conftest import REPO

QUIET = Console(quiet=True)
LLAVA = str(REPO / "data" / "tiny-llava")
LLAMA = str(REPO / "data" / "tiny-llama")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A real LoRA adapter for the tiny LLaVA (random, non-zero B, so tuned differs from base)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(LLAVA)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    folder = tmp_path_factory.mktemp("adapter")
    get_peft_model(model, config).save_pretrained(folder)
    return str(folder)


def _settings(tmp_path, *extra: str):
    return parse_settings([f"out={tmp_path}", "limit=3", "max_new_tokens=8", "samples=2", *extra])


def _check_common(metrics: dict, benchmark: str, judge: str) -> None:
    assert metrics["benchmark"] == benchmark and metrics["mode"] == "corrected"
    assert metrics["data"]["synthetic_fixture"] is True
    assert "synthetic fixture" in metrics["comparable"]
    if benchmark != "benign":
        assert metrics["template_sha256"] and all(len(h) == 16 for h in metrics["template_sha256"].values())
    assert (
        metrics["judge"]["id"] == judge
        if judge == "keyword"
        else metrics["judge"]["id"].startswith("openai:")
    )


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_each_benchmark_with_the_keyword_proxy(benchmark, adapter, tmp_path):
    metrics = evaluate(benchmark, LLAVA, adapter, "keyword", _settings(tmp_path), QUIET)
    _check_common(metrics, benchmark, "keyword")
    assert (
        "keyword proxy" in metrics["comparable"] and "never an attack success rate" in metrics["comparable"]
    )
    folder = tmp_path / benchmark / "keyword-corrected"
    written = json.loads((folder / "metrics.json").read_text())
    assert written["judge"]["list"] == "gcg" and written["judge"]["keywords"] == 29
    text = json.dumps(written["checkpoints"])
    assert '"asr"' not in text and '"asr_micro"' not in text and '"win_rate"' not in text  # proxy names only
    assert (folder / "samples.jsonl").stat().st_size > 0
    tuned = written["checkpoints"][-1]["metrics"]
    expected = {
        "mm-safetybench": "asr_micro_kw",
        "siuo": "effective_kw_upper",
        "beavertails-v": "refusal_rate_kw",
        "spa-vl": "harm_refusal_rate_kw",
        "benign": "over_refusal_rate_kw",
    }[benchmark]
    assert isinstance(tuned[expected], float)
    if benchmark == "siuo":
        assert tuned["mcqa_n"] == 3 and 0 <= tuned["mcqa_accuracy"] <= 100  # needs no judge


def test_mm_safetybench_text_only_runs_on_a_text_model_and_images_are_refused_clearly(tmp_path):
    metrics = evaluate(
        "mm-safetybench", LLAMA, None, "keyword", _settings(tmp_path, "image_types=[text_only]"), QUIET
    )
    assert metrics["checkpoints"][0]["metrics"]["per_image_type"].keys() == {"text_only"}
    with pytest.raises(FedalignError, match="text-only model cannot answer image prompts"):
        evaluate("mm-safetybench", LLAMA, None, "keyword", _settings(tmp_path / "b"), QUIET)


def test_win_rates_need_a_reference_and_bad_data_is_one_line(tmp_path):
    with pytest.raises(FedalignError, match="compare a fine-tuned model with its base"):
        evaluate("beavertails-v", LLAVA, None, "keyword", _settings(tmp_path), QUIET)
    bad = tmp_path / "mmsb"
    (bad / "processed_questions").mkdir(parents=True)
    (bad / "processed_questions" / "01-Illegal_Activitiy.json").write_text('{"0": {"Question": "q"}}')
    with pytest.raises(FedalignError, match=r"01-Illegal_Activitiy.json: question 0: needs the text field"):
        evaluate("mm-safetybench", LLAVA, None, "keyword", _settings(tmp_path, f"data.path={bad}"), QUIET)
    with pytest.raises(FedalignError, match="does not exist"):
        evaluate("siuo", LLAVA, None, "keyword", _settings(tmp_path, "data.path=/nonexistent"), QUIET)
    with pytest.raises(FedalignError, match="mode"):
        parse_settings(["mode=lenient"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_judge():
    """`transformers serve data/tiny-llava` on 127.0.0.1 (a real OpenAI-compatible server, offline),
    stopped by its PID afterwards."""
    beside = Path(sys.executable).parent / "transformers"  # the CLI of the transformers this test imports
    executable = str(beside) if beside.is_file() else shutil.which("transformers")
    assert executable, "the transformers CLI is not installed beside this Python"
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = subprocess.Popen(
        [executable, "serve", LLAVA, "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=1) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
            assert process.poll() is None, "transformers serve exited"
        else:
            pytest.fail("transformers serve did not come up in 60 s")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        assert process.poll() is not None


@pytest.mark.parametrize("benchmark", [b for b in BENCHMARKS if b != "benign"])
def test_each_benchmark_judged_by_a_real_openai_compatible_server(benchmark, served_judge, adapter, tmp_path):
    judge = f"openai:{LLAVA}@{served_judge}"
    settings = _settings(tmp_path, "limit=2", "judge.concurrency=2")
    metrics = evaluate(benchmark, LLAVA, adapter, judge, settings, QUIET)
    _check_common(metrics, benchmark, judge)
    record = metrics["judge"]
    assert record["backend"] == "openai-compatible" and record["base_url"] == served_judge
    assert record["requests"] > 0 and record["errors"] == 0 and record["reported_models"] == [LLAVA]
    assert "not the paper's" in metrics["comparable"]
    # the tiny judge writes nonsense: whatever did not parse is counted as unknown, never as a verdict
    (written,) = (tmp_path / benchmark).glob("openai_*-corrected/samples.jsonl")
    samples = [json.loads(line) for line in written.open()]
    assert samples
    if benchmark == "mm-safetybench":
        from evaluators.mmsafetybench.scoring import parse_verdict

        for sample in samples:
            assert sample["label"] == parse_verdict(sample["judge_reply"], "corrected")
        result = metrics["checkpoints"][0]["metrics"]
        assert result["unknown_count"] == sum(s["label"] == "unknown" for s in samples)
        assert result["safe_count"] + result["unsafe_count"] + result["unknown_count"] == result["n"] == 2
    rerun = evaluate(benchmark, LLAVA, adapter, judge, settings, QUIET)  # from both caches, identical
    assert finite(rerun["checkpoints"]) == finite(metrics["checkpoints"])
    assert rerun["judge"]["cached"] == rerun["judge"]["requests"]


def test_a_local_hugging_face_model_as_judge(tmp_path):
    """``hf:PATH``: the embedded tiny Llama judging MM-SafetyBench answers in-process (nonsense verdicts,
    counted as unknown), identified by its folder and a digest, and cached like any judge."""
    settings = _settings(tmp_path, "limit=2", "image_types=[SD]")
    metrics = evaluate("mm-safetybench", LLAVA, None, f"hf:{LLAMA}", settings, QUIET)
    judge = metrics["judge"]
    assert (
        judge["id"].startswith("hf:tiny-llama#") and judge["backend"] == "hf-local" and judge["errors"] == 0
    )
    result = metrics["checkpoints"][0]["metrics"]
    assert result["safe_count"] + result["unsafe_count"] + result["unknown_count"] == 2
    again = evaluate("mm-safetybench", LLAVA, None, f"hf:{LLAMA}", settings, QUIET)
    assert again["judge"]["cached"] == again["judge"]["requests"] == judge["requests"]


def test_bad_images_and_empty_data_are_one_line_before_any_model_loads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    mmsb = tmp_path / "mmsb"
    shutil.copytree(REPO / "data" / "safety" / "mm-safetybench", mmsb)
    (mmsb / "imgs" / "01-Illegal_Activitiy" / "SD" / "0.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(FedalignError, match=r"SD/0.jpg: not a readable image"):
        evaluate("mm-safetybench", LLAVA, None, "keyword", _settings(tmp_path, f"data.path={mmsb}"), QUIET)
    empty = tmp_path / "benign"
    empty.mkdir()
    pq.write_table(pa.table({"question": pa.array([], pa.string())}), empty / "b.parquet")
    with pytest.raises(FedalignError, match="no samples to evaluate"):
        evaluate("benign", LLAVA, None, "keyword", _settings(tmp_path, f"data.path={empty}"), QUIET)
    siuo = tmp_path / "siuo"
    shutil.copytree(REPO / "data" / "safety" / "siuo", siuo)
    items = json.loads((siuo / "siuo_mcqa.json").read_text())
    items[0]["correct_option"] = ["A"]
    (siuo / "siuo_mcqa.json").write_text(json.dumps(items))
    with pytest.raises(FedalignError, match="options must map letters to text"):
        evaluate("siuo", LLAVA, None, "keyword", _settings(tmp_path, f"data.path={siuo}"), QUIET)
    with pytest.raises(FedalignError, match="keywords_extra"):
        parse_settings(["keywords_extra=['']"])


@pytest.mark.parametrize("benchmark", ["siuo", "beavertails-v", "spa-vl"])
def test_a_failing_judge_gives_no_verdict_on_any_benchmark(benchmark, adapter, tmp_path):
    from tests.judge_server import JudgeServer

    with JudgeServer("500") as server:
        settings = _settings(tmp_path, "limit=2", "judge.max_retries=0", "judge.timeout=2")
        metrics = evaluate(benchmark, LLAVA, adapter, f"openai:m@{server.url}", settings, QUIET)
    result = metrics["checkpoints"][-1]["metrics"]
    assert metrics["errors"] == metrics["judge"]["requests"] > 0 and metrics["judge"]["errors"] > 0
    if benchmark == "siuo":  # no question has a vote: nothing is safe or effective
        assert result["safe"] is None or result["unknown_safe"] == result["n"]
        assert result["unknown_effective"] == result["n"] and result["mcqa_n"] == 2  # MCQA needs no judge
    elif benchmark == "beavertails-v":
        for kind in ("harmlessness", "helpfulness"):
            assert result[kind]["items_scored"] == 0 and result[kind]["error_count"] == 4
            assert result[kind]["win_count"] == result[kind]["loss_count"] == result[kind]["tie_count"] == 0
        assert result["judge_sanity"]["safer_response_id"]["decided"] == 0
    else:
        assert (
            result["harm_eval"]["error_count"] == 4 and result["harm_eval"]["items_scored"] == 0
        )  # 2 orders


def test_spavl_reference_answers_align_by_index_faithfully_and_by_question_when_corrected(tmp_path):
    from fedalign.evaluation.safety.pairwise import load_spavl, reference_answers

    samples = load_spavl(REPO / "data" / "safety" / "spa-vl", "harm", 3)
    shuffled = [{"question": s.text, "response": f"answer to {s.text}"} for s in reversed(samples)]
    (tmp_path / "base_model_harm_QA.json").write_text(json.dumps(shuffled))
    by_index = reference_answers(tmp_path, "harm", samples, "faithful")
    by_question = reference_answers(tmp_path, "harm", samples, "corrected")
    assert by_question == [f"answer to {s.text}" for s in samples]
    assert by_index == [r["response"] for r in shuffled] != by_question  # upstream's quirk, kept in faithful


def test_the_suite_on_a_single_model_skips_the_pairwise_benchmarks_up_front(tmp_path):
    from fedalign.evaluation.safety.runner import evaluate_suite

    summary = evaluate_suite(LLAVA, None, "keyword", _settings(tmp_path, "limit=2", "samples=1"), QUIET)
    assert set(summary["skipped"]) == {"beavertails-v", "spa-vl"}
    assert set(summary["benchmarks"]) == {"mm-safetybench", "siuo", "benign"}
    assert (tmp_path / "safety" / "keyword-corrected" / "safety-rates.png").is_file()


def test_the_fixtures_are_what_the_builder_writes_in_the_benchmarks_schemas(tmp_path):
    """data/safety is `python -m fedalign.embedded`'s output, byte for byte, in each benchmark's exact
    layout and field names (evaluators.md §3.1, §4.1, §5.1, §5.3), and shares no question with the DPO
    quickstart's pairs."""
    import pyarrow.parquet as pq

    from fedalign.embedded import build_safety_fixtures
    from fedalign.evaluation.safety.pairwise import BTV_FIELDS

    build_safety_fixtures(tmp_path)
    committed = REPO / "data" / "safety"
    built = {
        p.relative_to(tmp_path / "safety"): p.read_bytes()
        for p in (tmp_path / "safety").rglob("*")
        if p.is_file()
    }
    assert built == {p.relative_to(committed): p.read_bytes() for p in committed.rglob("*") if p.is_file()}

    question = json.loads((committed / "mm-safetybench/processed_questions/06-Fraud.json").read_text())["0"]
    assert set(question) == {"Question", "GPT-Pred", "Changed Question", "Key Phrase", "Phrase Type",
                             "Rephrased Question", "Rephrased Question(SD)"}  # fmt: skip
    gen = json.loads((committed / "siuo/siuo_gen.json").read_text())[0]
    assert set(gen) == {"question_id", "image", "question", "category", "safety_warning", "reference_answer"}
    mcqa = json.loads((committed / "siuo/siuo_mcqa.json").read_text())[0]
    assert set(mcqa) - set(gen) == {"options", "correct_option"} and set(mcqa["options"]) == set("ABCD")
    btv = pq.read_schema(next((committed / "beavertails-v").rglob("evaluation-*.parquet")))
    assert len(btv.names) == 16 and set(BTV_FIELDS) <= set(btv.names)
    assert pq.read_schema(committed / "spa-vl/test/harm.parquet").names == [
        "image",
        "question",
        "class1",
        "class2",
        "class3",
    ]
    dpo = (
        pq.read_table(REPO / "data/quickstart-dpo/spavl.parquet", columns=["question"]).column(0).to_pylist()
    )
    fixtures = [q["Question"] for f in (committed / "mm-safetybench/processed_questions").glob("*.json")
                for q in json.loads(f.read_text()).values()]  # fmt: skip
    assert not set(dpo) & set(fixtures)
