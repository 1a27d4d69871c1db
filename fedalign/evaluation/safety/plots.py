"""The suite's plots: MM-SafetyBench ASR per scenario (base vs tuned), and one panel of headline rates
(SIUO, BeaverTails-V, SPA-VL, the over-refusal control). A keyword-proxy run says so in every title."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLOURS = {"base": "#8c8c8c", "model": "#4c72b0", "tuned": "#dd8452"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def plot_suite(summary: dict[str, Any], folder: Path) -> list[Path]:
    plt = _pyplot()
    proxy = summary["judge"] == "keyword"
    suffix = " (keyword proxy: a lower bound on refusal)" if proxy else f" (judge {summary['judge']})"
    written = []

    mmsb = summary["benchmarks"]["mm-safetybench"]["checkpoints"]
    key = "asr_kw" if proxy else "asr"
    labels = list(mmsb)
    scenarios = sorted({s for m in mmsb.values() for s in m["per_scenario"]})
    fig, ax = plt.subplots(figsize=(10, 4), dpi=100)
    width = 0.8 / max(len(labels), 1)
    for offset, label in enumerate(labels):
        per = mmsb[label]["per_scenario"]
        values = [
            sum(v[key] for v in per[s].values()) / len(per[s]) if s in per else 0.0 for s in scenarios
        ]  # mean over the image types
        bars = ax.bar(
            [i + offset * width for i in range(len(scenarios))],
            values,
            width,
            label=label,
            color=COLOURS.get(label),
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=5)
    ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(scenarios))])
    ax.set_xticklabels([s.replace("_", "\n", 1) for s in scenarios], fontsize=6)
    ax.set_ylim(0, 1)
    ax.set_ylabel("ASR_kw" if proxy else "attack success rate")
    ax.set_title("MM-SafetyBench per scenario, mean over image types" + suffix, fontsize=9)
    ax.legend()
    fig.tight_layout()
    path = folder / "mm-safetybench-asr.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)

    rows = _headline_rates(summary, proxy)
    fig, ax = plt.subplots(figsize=(10, 4), dpi=100)
    names = list(rows)
    labels = sorted(
        {label for values in rows.values() for label in values}, key=["base", "model", "tuned"].index
    )
    width = 0.8 / max(len(labels), 1)
    for offset, label in enumerate(labels):
        values = [rows[n].get(label, 0.0) or 0.0 for n in names]
        bars = ax.bar(
            [i + offset * width for i in range(len(names))],
            values,
            width,
            label=label,
            color=COLOURS.get(label),
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(names))])
    ax.set_xticklabels(names, fontsize=6)
    ax.set_ylim(0, 1)
    ax.set_title("Safety and over-refusal rates" + suffix, fontsize=9)
    ax.legend()
    fig.tight_layout()
    path = folder / "safety-rates.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
    return written


def _headline_rates(summary: dict[str, Any], proxy: bool) -> dict[str, dict[str, float | None]]:
    """Rates in [0, 1] per checkpoint, named for the plot (SIUO's percentages divided by 100)."""
    bench = summary["benchmarks"]
    rows: dict[str, dict[str, float | None]] = {}

    def put(name: str, benchmark: str, key: str, scale: float = 1.0) -> None:
        if benchmark not in bench:  # skipped
            return
        values = {}
        for label, metrics in bench[benchmark]["checkpoints"].items():
            node: Any = metrics
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, int | float):
                values[label] = node * scale
        if values:
            rows[name] = values

    if proxy:
        put("MM-SafetyBench\nASR_kw", "mm-safetybench", "asr_micro_kw")
        put("SIUO\nsafe_proxy_kw", "siuo", "safe_proxy_kw", 0.01)
        put("SIUO\neffective_kw\n(upper bound)", "siuo", "effective_kw_upper", 0.01)
        put("BeaverTails-V\nrefusal_kw", "beavertails-v", "refusal_rate_kw")
        put("SPA-VL harm\nrefusal_kw", "spa-vl", "harm_refusal_rate_kw")
        # the pairwise benchmarks answer with the tuned model and its base (the reference)
        for name, benchmark, key in (
            ("BeaverTails-V\nrefusal_kw", "beavertails-v", "reference_refusal_rate_kw"),
            ("SPA-VL harm\nrefusal_kw", "spa-vl", "harm_reference_refusal_rate_kw"),
        ):
            tuned = bench.get(benchmark, {"checkpoints": {}})["checkpoints"].get("tuned", {})
            if name in rows and "base" not in rows[name] and isinstance(tuned.get(key), float):
                rows[name] = {"base": tuned[key], **rows[name]}
    else:
        put("MM-SafetyBench\nASR", "mm-safetybench", "asr_micro")
        put("SIUO\nsafe", "siuo", "safe", 0.01)
        put("SIUO\neffective", "siuo", "effective", 0.01)
        put("SIUO safe\n& effective", "siuo", "safe_effective", 0.01)
        put("BeaverTails-V\nharmlessness\nwin rate", "beavertails-v", "harmlessness.win_rate")
        put("BeaverTails-V\nhelpfulness\nwin rate", "beavertails-v", "helpfulness.win_rate")
        put("SPA-VL\nharm score", "spa-vl", "harm_eval.harm_score_first_order")
        put("SPA-VL\nhelp win rate", "spa-vl", "help_eval.help_win_rate_first_order")
    put("SIUO MCQA\naccuracy", "siuo", "mcqa_accuracy", 0.01)
    put("benign prompts\nover-refusal_kw", "benign", "over_refusal_rate_kw")
    return rows
