"""``fedalign report RUN_DIR [RUN_DIR ...]``: plots and a Markdown summary of finished runs, side by side.

What it reads is what the runs wrote: ``metrics.jsonl`` (public) and, where allowed, the client-private
``private/client_metrics.jsonl``. Every figure is drawn from one table of series, written beside the PNGs
as ``report.json``, so what a plot shows can be checked, and re-plotted, without reading pixels.

- ``metrics.png``: the clients' mean training loss per round, and every held-out metric the runs measured.
- ``epsilon.png`` (runs with DP): ε spent by the end of each round; per client under example- or pair-level
  DP when private records are read.
- ``bytes.png``: bytes sent up and down per round.
- ``report.md``: one row per run (held-out metrics before and after, ε, traffic, time) and the figures.

A DP run's client-private records (training losses, per-client ε, which reveals a client's row count, its
traffic under client-level DP) are not covered by ε, and a report is made to be shared: they are read only
with ``include_private`` (``--private``). A non-private run's are read always, as its own ``loss.png`` does.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedalign.errors import FedalignError
from fedalign.runtime.metrics import CLIENT_METRICS, PRIVATE_DIR

FIGURES = ("metrics.png", "epsilon.png", "bytes.png")
_EVAL_LABELS = {  # held-out metric -> axis label
    "eval_loss": "held-out loss (per completion token)",
    "reward_accuracy": "held-out reward accuracy",
    "reward_margin": "held-out reward margin",
    "preferred_rate": "preferred behaviour rate",
}
_MIB = 2**20

Series = dict[str, list[float]]  # {"x": rounds, "y": values}


@dataclass
class RunRecords:
    """One run's records as the report reads them."""

    run_dir: Path
    label: str
    algorithm: str
    unit: str  # privacy.unit: none, example, pair, client
    budget: str  # "ε=4" (calibrated to it) or "σ=0.8" (a fixed noise multiplier); "" without DP
    public: list[dict[str, Any]]
    private: list[dict[str, Any]] = field(default_factory=list)
    private_read: bool = False

    def of_type(self, kind: str, private: bool = False) -> list[dict[str, Any]]:
        return [r for r in (self.private if private else self.public) if r.get("type") == kind]

    @property
    def summary(self) -> dict[str, Any]:
        return next(iter(self.of_type("summary")), {})


class ReportError(FedalignError):
    """A run directory the report cannot read, or a folder it cannot write."""


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ReportError(f"{path}: cannot read: {error}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):  # a killed run's torn last line
                continue
            raise ReportError(f"{path}: line {number}: not a JSON record") from None
        if not isinstance(record, dict) or "type" not in record:
            raise ReportError(f"{path}: line {number}: not a fedalign metrics record")
        records.append(record)
    return records


def read_run(run_dir: Path, include_private: bool = False) -> RunRecords:
    """A run directory's records; its recipe says the algorithm and what DP covers."""
    metrics, recipe_path = run_dir / "metrics.jsonl", run_dir / "recipe.yaml"
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    if not metrics.is_file() or not recipe_path.is_file():
        raise ReportError(f"{run_dir}: not a fedalign run directory (no metrics.jsonl and recipe.yaml)")
    try:
        recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ReportError(f"{recipe_path}: cannot read: {error}".splitlines()[0]) from None
    if not isinstance(recipe, dict):
        raise ReportError(f"{recipe_path}: not a recipe")
    privacy = recipe.get("privacy") or {}
    unit = privacy.get("unit", "none")
    run = RunRecords(
        run_dir=run_dir,
        label=run_dir.name,
        algorithm=str((recipe.get("algorithm") or {}).get("name", "fedavg")),
        unit=unit,
        budget=_budget(privacy) if unit != "none" else "",
        public=_read_jsonl(metrics),
    )
    private = run_dir / PRIVATE_DIR / CLIENT_METRICS
    if (include_private or unit == "none") and private.is_file():
        run.private, run.private_read = _read_jsonl(private), True
    return run


def _budget(privacy: dict[str, Any]) -> str:
    if isinstance(privacy.get("target_epsilon"), (int, float)):
        return f"ε={privacy['target_epsilon']:g}"
    if isinstance(privacy.get("noise_multiplier"), (int, float)):
        return f"σ={privacy['noise_multiplier']:g}"
    return ""


def _labels(runs: list[RunRecords]) -> None:
    """Legend labels: the algorithm (and DP budget), with the directory name where two would collide."""
    for run in runs:
        run.label = run.algorithm + ("" if run.unit == "none" else f", {run.unit} DP {run.budget}".rstrip())
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.label] = seen.get(run.label, 0) + 1
    for run in runs:
        if seen[run.label] > 1:
            run.label = f"{run.label} ({run.run_dir.name})"


def _series(records: list[dict[str, Any]], key: str) -> Series:
    points = [(r["round"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return {"x": [x for x, _ in points], "y": [float(y) for _, y in points]}


def _epsilon_per_client(run: RunRecords, most: int = 12) -> dict[str, Series]:
    """Each client's ε by the end of every round from its first visit on (it stays put between visits);
    with more than ``most`` clients, the largest, median and smallest over the clients that have spent."""
    spent: dict[int, dict[int, float]] = {}  # round -> client -> ε after its visit in that round
    for r in run.of_type("client", private=True):
        if isinstance(r.get("epsilon"), (int, float)):
            spent.setdefault(r["round"], {})[r["client"]] = float(r["epsilon"])
    last = max((r["round"] for r in run.of_type("round", private=True)), default=max(spent, default=0))
    current: dict[int, float] = {}
    per_round: list[tuple[int, dict[int, float]]] = []
    for round_ in range(min(spent, default=1), last + 1):
        current.update(spent.get(round_, {}))
        per_round.append((round_, dict(current)))
    clients = sorted(current)
    if len(clients) <= most:
        return {
            f"client {c}": {
                "x": [x for x, e in per_round if c in e],
                "y": [e[c] for _, e in per_round if c in e],
            }
            for c in clients
        }
    stats = {"largest": max, "median": lambda v: sorted(v)[len(v) // 2], "smallest": min}
    return {
        f"{name} over clients": {
            "x": [x for x, _ in per_round],
            "y": [f(list(e.values())) for _, e in per_round],
        }
        for name, f in stats.items()
    }


def collect(runs: list[RunRecords]) -> dict[str, Any]:
    """Every series the figures draw: {figure: {panel: {line label: {"x": [...], "y": [...]}}}}, plus what
    was left out and why."""
    metrics: dict[str, dict[str, Series]] = {"train_loss": {}}
    epsilon: dict[str, dict[str, Series]] = {}
    traffic: dict[str, dict[str, Series]] = {"bytes_up": {}, "bytes_down": {}}
    left_out: list[str] = []
    for run in runs:
        if run.private_read:
            metrics["train_loss"][run.label] = _series(run.of_type("round", private=True), "loss")
        else:
            left_out.append(
                f"{run.label}: training loss and per-client ε (client-private under DP; --private)"
            )
        evals = run.of_type("eval")
        measured = {
            k
            for e in evals
            for k, v in e.items()
            if k not in ("type", "round") and isinstance(v, (int, float))
        }
        for key in sorted(measured, key=lambda k: (k != "eval_loss", k)):  # held-out loss first
            metrics.setdefault(key, {})[run.label] = _series(evals, key)
        if run.unit != "none":  # the public ε: the run's (client-level), or the largest client's
            key = "epsilon" if run.unit == "client" else "epsilon_max"
            line = run.label if run.unit == "client" else f"{run.label} (largest client)"
            epsilon.setdefault("epsilon", {})[line] = _series(run.of_type("round"), key)
            if run.private_read and run.unit in ("example", "pair"):
                epsilon[f"epsilon_clients: {run.label}"] = _epsilon_per_client(run)
        rounds = run.of_type("round")
        source = (
            rounds if any("bytes_up" in r for r in rounds) else run.of_type("round", private=run.private_read)
        )
        for key in traffic:
            series = _series(source, key)
            if series["x"]:
                traffic[key][run.label] = {"x": series["x"], "y": [y / _MIB for y in series["y"]]}
        if not any(traffic[k].get(run.label) for k in traffic):
            left_out.append(f"{run.label}: bytes per round (client-private under client-level DP; --private)")
    drawn = {"metrics.png": metrics, "bytes.png": traffic, "epsilon.png": epsilon}
    figures = {}  # a panel with no line, and a figure with no panel, are left out (a run killed early)
    for name, panels in drawn.items():
        kept = {panel: lines for panel, lines in panels.items() if lines}
        if kept:
            figures[name] = kept
    return {"figures": figures, "left_out": left_out}


def _axis_label(panel: str) -> str:
    if panel == "train_loss":
        return "training loss (clients' mean)"
    if panel.startswith("bytes_"):
        return f"MiB sent {'up (clients → server)' if panel == 'bytes_up' else 'down (server → clients)'}"
    if panel == "epsilon":
        return "ε spent"
    if panel.startswith("epsilon_clients"):
        return "ε spent by each client"
    return _EVAL_LABELS.get(panel, f"held-out {panel}")


def _draw(panels: dict[str, dict[str, Series]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), dpi=110, squeeze=False)
    for ax, (panel, lines) in zip(axes.flat, panels.items(), strict=False):
        for index, (label, s) in enumerate(lines.items()):
            # runs that coincide (the same ε schedule, the same bytes) stay visible: each later line is
            # thinner and dashed differently, drawn over the earlier ones
            ax.plot(
                s["x"],
                s["y"],
                linestyle=_LINESTYLES[index % len(_LINESTYLES)],
                linewidth=max(2.8 - 0.5 * index, 1.0),
                marker="o" if len(s["x"]) <= 12 else None,
                markersize=3,
                label=label,
                drawstyle="steps-post" if panel.startswith("epsilon") else "default",  # ε holds
            )
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(_axis_label(panel))
        if panel.startswith("epsilon_clients"):
            ax.set_title(panel.split(": ", 1)[1], fontsize=9)
        if panel.startswith(("bytes_", "epsilon")):  # amounts: their zero is meaningful
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize=7, ncol=2 if len(lines) > 6 else 1)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


_LINESTYLES = ("-", "--", "-.", ":")
_TITLES = {
    "metrics.png": "Training and held-out metrics per round",
    "epsilon.png": "Privacy spent per round",
    "bytes.png": "Communication per round",
}


def _fmt(value: Any, digits: int = 4) -> str:
    return "–" if not isinstance(value, (int, float)) else f"{value:.{digits}f}"


def summary_markdown(runs: list[RunRecords], data: dict[str, Any]) -> str:
    columns = ["run", "directory", "algorithm", "DP", "rounds", "held-out loss before → after", "change"]
    columns += ["ε spent", "MiB up", "MiB down", "round loop s"]
    lines = ["# fedalign report", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for run in runs:
        s = run.summary
        before, after = s.get("eval_before"), s.get("eval_after")
        change = f"{(after - before) / before * 100:+.1f}%" if before and after is not None else "–"
        traffic = data["figures"].get("bytes.png", {})
        up, down = traffic.get("bytes_up", {}).get(run.label), traffic.get("bytes_down", {}).get(run.label)
        dp = "none" if run.unit == "none" else f"{run.unit}, {run.budget}".rstrip(", ")
        lines.append(
            f"| {run.label} | `{run.run_dir}` | {run.algorithm} | {dp} | {s.get('rounds', '–')} "
            f"| {_fmt(before)} → {_fmt(after)} | {change} | {_fmt(s.get('epsilon'), 3)} "
            f"| {_fmt(sum(up['y']) if up else None, 3)} | {_fmt(sum(down['y']) if down else None, 3)} "
            f"| {_fmt(s.get('rounds_wall_s'), 1)} |"
        )
    others = sorted({k for run in runs for k in run.summary.get("metrics_after", {}) if k != "eval_loss"})
    if others:
        lines += ["", "| run | " + " | ".join(f"{k} before → after" for k in others) + " |"]
        lines.append("|---|" + "---|" * len(others))
        for run in runs:
            b, a = run.summary.get("metrics_before", {}), run.summary.get("metrics_after", {})
            cells = [f"{_fmt(b.get(k), 3)} → {_fmt(a.get(k), 3)}" for k in others]
            lines.append(f"| {run.label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "A run still going, or stopped, has no summary record: its before/after cells are empty.",
        "",
    ]
    for name in data["figures"]:
        lines += [f"## {_TITLES[name]}", "", f"![{_TITLES[name]}]({name})", ""]
    if data["left_out"]:
        lines += ["## Left out", ""] + [f"- {line}" for line in data["left_out"]] + [""]
    lines.append("Series drawn: `report.json`.")
    return "\n".join(lines) + "\n"


def write_report(run_dirs: list[Path], out: Path, include_private: bool = False) -> list[Path]:
    """Reads the runs, writes the figures, ``report.json`` and ``report.md`` into ``out`` (all or nothing:
    they are made in a temporary folder beside it and moved in), and returns the files written."""
    if not run_dirs:
        raise ReportError("report: give at least one run directory")
    runs = [read_run(Path(d), include_private) for d in run_dirs]
    _labels(runs)
    data = collect(runs)
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    except OSError as error:
        raise ReportError(f"{out}: cannot write the report: {error.strerror}") from None
    try:
        for name, panels in data["figures"].items():
            _draw(panels, staging / name, _TITLES[name])
        (staging / "report.json").write_text(json.dumps(data, indent=1) + "\n")
        (staging / "report.md").write_text(summary_markdown(runs, data))
        written = []
        for file in sorted(staging.iterdir()):
            os.replace(file, out / file.name)
            written.append(out / file.name)
        for stale in set(FIGURES) - set(data["figures"]):  # an earlier report's, for other runs
            (out / stale).unlink(missing_ok=True)
        return written
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()
