"""``fedalign eval lm-eval``: an lm-evaluation-harness task on a fedalign checkpoint through lm-eval's own
HF backend, offline on a local task; a hub task that cannot be reached offline is one clear line."""

import json
from pathlib import Path

from typer.testing import CliRunner

from fedalign.cli import app

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "data" / "tiny-llama"
TASK = """task: local_gsm
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer.split('####')[-1].strip()}}}}"
generation_kwargs:
  until: ["Q:"]
  do_sample: false
  max_gen_toks: 8
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def test_a_local_lm_eval_task_runs_on_a_checkpoint(tmp_path) -> None:
    lines = (REPO / "tests" / "fixtures" / "gsm8k" / "train.jsonl").read_text().splitlines()[:4]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    out = tmp_path / "out"
    args = ["eval", "lm-eval", str(TINY), "--tasks", "local_gsm", f"include_path={tasks}", f"out={out}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    written = json.loads((out / "results.json").read_text())
    scores = written["checkpoints"][0]["results"]["local_gsm"]
    assert scores["exact_match,none"] == 0.0 and written["checkpoints"][0]["label"] == "model"
    assert "local_gsm" in result.output


def test_unknown_or_unreachable_tasks_fail_in_one_line(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    unknown = CliRunner().invoke(app, ["eval", "lm-eval", str(TINY), "--tasks", "no_such_task"])
    assert unknown.exit_code == 2 and "is not an lm-eval task" in unknown.output
    offline = CliRunner().invoke(app, ["eval", "lm-eval", str(TINY), "--tasks", "gsm8k", "limit=2"])
    assert offline.exit_code == 2
    assert "lm-eval could not run them here" in " ".join(offline.output.split())
    assert [
        x for x in offline.output.splitlines() if x.startswith("error:")
    ] and "Traceback" not in offline.output
    assert list(tmp_path.iterdir()) == []
