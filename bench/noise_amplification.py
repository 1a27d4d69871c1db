"""How much of DP noise in the LoRA factors reaches their product BA, and how much more than linearly.

The FedASK paper's argument against DP-FedAvg-LoRA: noise added to both factors is amplified through their
product. With the noisy factors A + Eₐ and B + E_b, the product's error is

    (B + E_b)(A + Eₐ) − BA = E_b·A + B·Eₐ  (linear)  +  E_b·Eₐ  (quadratic: the amplification),

and FFA-LoRA and FedASK, which freeze A, have no quadratic term. This script measures the terms on the
miniature of ``bench/claims.py``: for each method and seed, the claims' run at ε = 6 (Dirichlet 0.5) is
paired with a *twin*, the same run (seed, cohorts, Poisson draws, clipping) with σ = 0.001 instead of the
calibrated σ, so the difference of their final adapters is what the noise did. Reported per method, over
seeds: the relative error of the product ‖ΔW‖/‖W‖, the quadratic term against the linear one ‖E_bEₐ‖/‖E_bA +
BEₐ‖, and the noise per coordinate of each factor against the size of its entries (RMS).

Then a Monte Carlo check at Llama-2 shapes that the quadratic share depends on the noise per coordinate
relative to the entries, σₐ/a and σ_b/b, and not on d, k or r: ‖E_bEₐ‖/‖E_bA + BEₐ‖ ≈ σₐσ_b/√(σ_b²a² + σₐ²b²).

    python bench/noise_amplification.py      # after bench/claims.py (it reuses the ε = 6 runs)
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"

import torch  # noqa: E402
from claims import OUT, REPO, Cell, load_results, split_data  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

METHODS = ("fedavg", "ffa", "fedask")
TWIN_SIGMA = 0.001


def twin_overrides(result: dict, data: dict[str, Path]) -> list[str]:
    """The ε = 6 run's settings with σ fixed at TWIN_SIGMA (same seed, so the same draws)."""
    cell = Cell(result["claim"], result["method"], None, result["split"], result["clients"], result["seed"],
                result["lr"])  # fmt: skip
    settings = cell.overrides(data, result["rounds"], result["local_steps"])
    settings = [s if not s.startswith("name=") else f"name={result['key']}-twin" for s in settings]
    return [
        *settings,
        "privacy.unit=example",
        f"privacy.noise_multiplier={TWIN_SIGMA}",
        "privacy.accountant=rdp",
        "privacy.delta=1e-4",
        "privacy.clip_norm=1.0",
        "privacy.randomness=seeded",
    ]


def run_twin(result: dict, data: dict[str, Path]) -> Path:
    from rich.console import Console

    from fedalign.recipe import load_recipe
    from fedalign.runtime.sft import run_sft

    done = sorted((OUT / "runs").glob(f"{result['key']}-twin-*/adapter/adapter_model.safetensors"))
    if done:
        return done[-1].parent.parent
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", twin_overrides(result, data))
    return run_sft(recipe, Console(file=io.StringIO())).run_dir


def _pairs(adapter: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        key[: -len(".lora_A.weight")]: (
            adapter[key].double(),
            adapter[key.replace("lora_A", "lora_B")].double(),
        )
        for key in adapter
        if key.endswith(".lora_A.weight")
    }


def decompose(noisy_dir: Path, clean_dir: Path) -> dict[str, float]:
    """The product's error and its parts, summed over modules (Frobenius norms, squared then rooted)."""
    name = "adapter/adapter_model.safetensors"
    noisy, clean = _pairs(load_file(noisy_dir / name)), _pairs(load_file(clean_dir / name))
    sums = dict.fromkeys(("dw", "w", "linear", "quadratic", "ea", "a", "eb", "b", "na", "nb"), 0.0)
    for module, (a, b) in clean.items():
        a_n, b_n = noisy[module]
        e_a, e_b = a_n - a, b_n - b
        sums["dw"] += float((b_n @ a_n - b @ a).norm() ** 2)
        sums["w"] += float((b @ a).norm() ** 2)
        sums["linear"] += float((e_b @ a + b @ e_a).norm() ** 2)
        sums["quadratic"] += float((e_b @ e_a).norm() ** 2)
        for key, value in (("ea", e_a), ("a", a), ("eb", e_b), ("b", b)):
            sums[key] += float(value.norm() ** 2)
        sums["na"] += a.numel()
        sums["nb"] += b.numel()
    return {
        "product_error": math.sqrt(sums["dw"] / sums["w"]),
        "quadratic_share": math.sqrt(sums["quadratic"] / sums["linear"]) if sums["linear"] else 0.0,
        "noise_a_per_entry": math.sqrt(sums["ea"] / sums["a"]),  # σₐ / a (RMS over entries)
        "noise_b_per_entry": math.sqrt(sums["eb"] / sums["b"]),  # σ_b / b
        "rms_a": math.sqrt(sums["a"] / sums["na"]),
        "rms_ea": math.sqrt(sums["ea"] / sums["na"]),
    }


def monte_carlo(
    d: int, k: int, r: int, rel_a: float, rel_b: float, gen: torch.Generator
) -> tuple[float, float]:
    """Measured and predicted ‖E_bEₐ‖/‖E_bA + BEₐ‖ for Gaussian factors with entries of RMS a = b = 1 and
    noise of RMS rel_a, rel_b per entry."""
    a, b = torch.randn(r, k, generator=gen), torch.randn(d, r, generator=gen)
    e_a, e_b = rel_a * torch.randn(r, k, generator=gen), rel_b * torch.randn(d, r, generator=gen)
    measured = float((e_b @ e_a).norm() / (e_b @ a + b @ e_a).norm())
    predicted = rel_a * rel_b / math.sqrt(rel_b**2 + rel_a**2)  # the two linear terms are orthogonal-ish
    return measured, predicted


def main() -> None:
    results = load_results()
    data = split_data()
    rows: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    for r in sorted(results.values(), key=lambda r: r["key"]):
        setting = (r["phase"], r["claim"], r["epsilon"], r["split"]) == ("main", "fedask", 6.0, "0.5")
        if setting and r["method"] in METHODS:
            twin = run_twin(r, data)
            parts = decompose(REPO / r["run_dir"], twin)
            rows[r["method"]].append(parts)
            print(f"{r['key']}: " + ", ".join(f"{k} {v:.4g}" for k, v in parts.items()), flush=True)
    print("\n| method (ε = 6, Dir 0.5) | ‖ΔW‖/‖W‖ | quadratic / linear | σₐ/a | σ_b/b | seeds |")
    print("|---|---|---|---|---|---|")
    for method, parts in rows.items():
        if not parts:
            continue

        def cell(key: str, parts: list[dict[str, float]] = parts) -> str:
            values = [p[key] for p in parts]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.3g} ± {spread:.2g}"

        keys = ("product_error", "quadratic_share", "noise_a_per_entry", "noise_b_per_entry")
        print(f"| {method} | " + " | ".join(cell(k) for k in keys) + f" | {len(parts)} |")
    gen = torch.Generator().manual_seed(0)
    print("\n| d = k | r | σₐ/a = σ_b/b | quadratic / linear, measured | predicted |")
    print("|---|---|---|---|---|")
    for d, r in ((128, 8), (4096, 16), (5120, 16), (5120, 64)):
        for rel in (0.1, 1.0, 3.0):
            measured, predicted = monte_carlo(d, d, r, rel, rel, gen)
            print(f"| {d} | {r} | {rel:g} | {measured:.3f} | {predicted:.3f} |")
    init = {k: 1 / math.sqrt(3 * k) for k in (128, 4096, 5120)}
    print("\nRMS of an entry of A at PEFT's init (kaiming-uniform, a = 1/√(3k)): "
          + ", ".join(f"k = {k}: {v:.4f}" for k, v in init.items()))  # fmt: skip
    print(json.dumps({m: len(p) for m, p in rows.items()}))


if __name__ == "__main__":
    main()
