"""``fedalign eval lm-eval``: any lm-evaluation-harness task on a fedalign checkpoint, through lm-eval's
own HF backend (the FedASK paper's other text benchmarks: MMLU, DROP), instead of re-implementing them.

lm-eval is an optional extra (``pip install lm-eval``, torch first). Each checkpoint (a run directory's
base and tuned model, or a base with ``--adapter``) is loaded by fedalign with every adapter merged, and
handed to lm-eval's ``HFLM``. lm-eval fetches its tasks' data from the Hugging Face hub unless a task
reads local files (``include_path=`` a folder of task YAMLs): offline, a hub task fails in one line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedalign.errors import DataError, FedalignError, RecipeError
from fedalign.evaluation.checkpoint import is_run_dir, resolve
from fedalign.models.loading import resolve_device


def evaluate_lm_eval(
    target: str,
    adapter: str | None,
    tasks: list[str],
    settings: dict[str, Any],
    console: Console | None = None,
) -> dict[str, Any]:
    console = console or Console()
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:  # an optional extra
        raise FedalignError(
            "eval lm-eval: lm-evaluation-harness is not installed; pip install lm-eval (torch first)"
        ) from None
    unknown = set(settings) - {"include_path", "limit", "num_fewshot", "batch_size", "device", "out"}
    if unknown:
        raise RecipeError(f"eval: {sorted(unknown)[0]}: not a setting of lm-eval evaluation")
    checkpoints = resolve(target, adapter)
    for name in ("lm-eval", "lm_eval"):  # its progress chatter would bury fedalign's one-line errors
        logging.getLogger(name).setLevel(logging.ERROR)
    manager = TaskManager(include_path=settings.get("include_path"))
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise RecipeError(f"--tasks: {missing[0]!r} is not an lm-eval task (include_path= adds local ones)")
    device = resolve_device(str(settings.get("device", "auto")))
    results: dict[str, Any] = {"tasks": tasks, "checkpoints": []}
    for checkpoint in checkpoints:
        model, tokenizer = checkpoint.load(device)
        harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=int(settings.get("batch_size", 8)))
        try:
            out = lm_eval.simple_evaluate(
                model=harness,
                tasks=tasks,
                task_manager=manager,
                limit=settings.get("limit"),
                num_fewshot=settings.get("num_fewshot"),
            )
        except FedalignError:
            raise
        except Exception as error:  # lm-eval's data loading: the hub unreachable, a dataset missing
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            what = f"{type(error).__name__}: {first}"
            raise DataError(
                f"--tasks {','.join(tasks)}: lm-eval could not run them here ({what}); offline, point "
                "include_path= at task YAMLs that read local files"
            ) from None
        results["checkpoints"].append({**checkpoint.describe(), "results": out["results"]})
    folder = _folder(target, tasks, settings)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=1, default=str))
    _print(console, results, folder)
    return results


def _folder(target: str, tasks: list[str], settings: dict[str, Any]) -> Path:
    if settings.get("out"):
        return Path(str(settings["out"])).expanduser()
    name = "lm-eval-" + "+".join(tasks)
    path = Path(target).expanduser()
    return path / "eval" / name if is_run_dir(path) else Path("evals") / name


def _print(console: Console, results: dict[str, Any], folder: Path) -> None:
    table = Table(title="lm-evaluation-harness", show_edge=False)
    table.add_column("task")
    table.add_column("metric")
    for checkpoint in results["checkpoints"]:
        table.add_column(checkpoint["label"], justify="right")
    first = results["checkpoints"][0]["results"]
    for task_name, metrics in first.items():
        for metric, value in metrics.items():
            if not isinstance(value, int | float) or "stderr" in metric:
                continue
            row = [c["results"].get(task_name, {}).get(metric) for c in results["checkpoints"]]
            table.add_row(task_name, metric, *(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row))
    console.print(table)
    console.print(f"written to {folder}")
