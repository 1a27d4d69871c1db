"""What secret noise costs: a keyed draw (AES-256-CTR keystream, Box-Muller in float64) against
``torch.randn`` from a seeded generator, for as many values as a LoRA adapter has.

Sizes: 131k (the 47.8M-parameter bench model, r=8), 8.4M (Llama-2-7B, r=16 on q/v, the FedASK recipe) and
134M (LLaVA-1.5-7B, r=256 on q/v, the SPA-VL recipe). Medians of repeats, on the CPU.

    python bench/noise_draw.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedalign.privacy.randomness import SecretRandomness

SIZES = {"47.8M bench model, r=8": 131_072, "Llama-2-7B, r=16": 8_388_608, "LLaVA-1.5-7B, r=256": 134_217_728}


def seconds(draw, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        draw()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    key, generator = SecretRandomness.fresh(), torch.Generator().manual_seed(0)
    print("| LoRA values | torch.randn (seeded) | keyed draw | ratio |\n|---|---|---|---|")
    for name, numel in SIZES.items():
        repeats = args.repeats if numel < 50_000_000 else max(1, args.repeats // 2)
        seeded = seconds(lambda n=numel: torch.randn(n, generator=generator), repeats)
        keyed = seconds(lambda n=numel: key.child("noise", 0).gaussian(n, 1.0), repeats)
        cells = f"{seeded * 1e3:.1f} ms | {keyed * 1e3:.1f} ms | {keyed / seeded:.1f}×"
        print(f"| {name} ({numel:,}) | {cells} |")


if __name__ == "__main__":
    main()
