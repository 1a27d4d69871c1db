"""The end of a run as a person reads it: a summary table on the terminal and a loss plot in the run dir.

The terminal summary is the operator's view and reads the client-private records too (training losses,
cohorts). ``loss.png`` is published with the run, so under DP it plots only what DP covers (held-out
loss); the clients' training losses are not covered by ε.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedalign.runtime.metrics import MetricsLog

_MAX_ROWS = 20
_DPO_LINES = (
    ("reward_accuracy", "held-out reward accuracy (chosen > rejected; 0.5 is chance)"),
    ("reward_margin", "held-out reward margin"),
    ("preferred_rate", "preferred behaviour on held-out prompts (eval.preferred_pattern)"),
)


def _mib(n: float) -> str:
    return f"{n / 2**20:.3f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _evenly(items: list, limit: int) -> list:
    if len(items) <= limit:
        return items
    step = (len(items) - 1) / (limit - 1)
    return [items[round(i * step)] for i in range(limit)]


_COLUMNS = {  # column -> (record field, format); a column shows when the records have its field
    "round": ("round", str),
    "clients": ("clients", lambda v: ",".join(map(str, v))),
    "train loss": ("loss", lambda v: "-" if v is None else f"{v:.4f}"),
    "ε": ("epsilon", lambda v: f"{v:.3f}"),
    "ε max": ("epsilon_max", lambda v: f"{v:.3f}"),
    "bytes up": ("bytes_up", _mib),
    "bytes down": ("bytes_down", _mib),
    "wall s": ("wall_s", lambda v: f"{v:.2f}"),
}


def print_summary(
    console: Console,
    metrics: MetricsLog,
    run_dir: Path,
    wall_s: float,
    note: str | None = None,
    private: bool = False,
) -> None:
    """The round table and per-client traffic. With ``private`` (a DP run) only the public records are
    shown, so that a pasted terminal log holds no client-private record."""
    rounds = metrics.of_type("round", private=not private)
    records = {r["round"]: r for r in metrics.of_type("eval")}
    evals = {k: r["eval_loss"] for k, r in records.items() if r.get("eval_loss") is not None}
    shown = [c for c, (key, _) in _COLUMNS.items() if rounds and key in rounds[-1]]
    table = Table(title="Rounds", show_edge=False)
    for column in [*shown[:3], "held-out loss", *shown[3:]]:
        table.add_column(column, justify="right")
    for r in _evenly(rounds, _MAX_ROWS):
        held = evals.get(r["round"])
        cells = [_COLUMNS[c][1](r[_COLUMNS[c][0]]) for c in shown]
        table.add_row(*cells[:3], "" if held is None else f"{held:.4f}", *cells[3:])
    console.print(table)
    if not private:  # per-client traffic shows who took part, which client-level DP keeps secret
        _print_clients(console, metrics)
    _print_end(console, metrics, records, evals, run_dir, wall_s, note)


def _print_clients(console: Console, metrics: MetricsLog) -> None:
    per_client: dict[int, dict[str, int]] = defaultdict(lambda: {"visits": 0, "up": 0, "down": 0})
    for c in metrics.of_type("client", private=True):
        entry = per_client[c["client"]]
        entry["visits"] += 1
        entry["up"] += c["bytes_up"]
        entry["down"] += c["bytes_down"]
    clients = Table(title="Communication per client", show_edge=False)
    for column in ("client", "visits", "sent", "received"):
        clients.add_column(column, justify="right")
    ordered = sorted(per_client.items())
    for client, entry in ordered[:_MAX_ROWS]:
        clients.add_row(str(client), str(entry["visits"]), _mib(entry["up"]), _mib(entry["down"]))
    if len(ordered) > _MAX_ROWS:
        clients.add_row(f"... {len(ordered) - _MAX_ROWS} more", "", "", "")
    console.print(clients)


def _print_end(
    console: Console,
    metrics: MetricsLog,
    records: dict,
    evals: dict,
    run_dir: Path,
    wall_s: float,
    note: str | None,
) -> None:
    before, after = evals.get(0), evals.get(max(evals)) if evals else None
    if before is not None and after is not None:
        change = (after - before) / before * 100
        console.print(f"held-out loss: {before:.4f} -> {after:.4f} ({change:+.1f}%)")
    if records:
        first, last = records[min(records)], records[max(records)]
        for key, label in _DPO_LINES:
            if key in first and key in last:
                console.print(f"{label}: {first[key]:.3f} -> {last[key]:.3f}")
    summary = next(iter(metrics.of_type("summary")), {})
    if summary.get("epsilon") is not None:
        console.print(f"privacy spent: ε = {summary['epsilon']:.3f}")
    if note is not None:
        console.print(f"[bold yellow]{note}[/]")
    console.print(f"wall time: {wall_s:.1f} s    run directory: {run_dir}")


def plot_losses(metrics: MetricsLog, path: Path, train: bool = True) -> None:
    """``loss.png``: held-out loss where it was measured and, with ``train``, the clients' mean training
    loss per round (left out under DP: it is client-private)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    evals = metrics.of_type("eval")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        rounds = metrics.of_type("round", private=True)
        ax.plot([r["round"] for r in rounds], [r["loss"] for r in rounds], label="train (clients' mean)")
    evals = [e for e in evals if e.get("eval_loss") is not None]
    ax.plot([e["round"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="held-out")
    ax.set_xlabel("round")
    ax.set_ylabel("loss per completion token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
