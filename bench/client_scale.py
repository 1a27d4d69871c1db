"""Scale in clients: peak memory, round time and setup time with 10 to 10,000 clients, 2 selected per round.

The same federated run (the embedded tiny model, 24,000 Dolly-schema rows made from the embedded set, IID,
2 clients per round, 20 rounds of 2 local steps of batch 2, optimizer state persisted per client so that
every visited client has state to keep, a checkpoint every round) with 10, 100, 1,000 and 10,000 clients,
each in a fresh process. The work per round is the same in every configuration; what grows with the
client count is only the bookkeeping: the partition, the client-state store, the sampling.

- peak RSS: the process's high-water mark (``ru_maxrss``), everything included;
- round time: the median of the rounds' own wall times (``metrics.jsonl``);
- setup: the command's time before the first round (loading, tokenizing, partitioning), reported apart.

Targets: memory and round time at 10,000 clients ≤ 1.05× those at 10.

    python bench/client_scale.py [--clients 10 100 1000 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = 24_000

CHILD = """
import io, json, os, resource, sys, time
started = time.perf_counter()
for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[v] = "1"
import torch
torch.set_num_threads(2)
from rich.console import Console
from fedalign.recipe import validate_recipe
from fedalign.runtime.sft import run_sft
raw = json.loads(sys.argv[1])
result = run_sft(validate_recipe(raw), Console(file=io.StringIO()))
total = time.perf_counter() - started
records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
rounds = [r["wall_s"] for r in records if r["type"] == "round"]
summary = next(r for r in records if r["type"] == "summary")
state = sum(f.stat().st_size for f in (result.run_dir / "private" / "clients").glob("*.safetensors"))
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "round_s": rounds, "loop_s": summary["rounds_wall_s"], "total_s": total,
                  "client_state_on_disk_bytes": state}))
"""


def make_rows(path: Path) -> None:
    """24,000 rows, each an embedded row's instruction and response with a few words of another's, so
    that no two rows are the same (the embedded set has 2,400)."""
    rng = random.Random(0)
    source = [json.loads(line) for line in (REPO / "data" / "quickstart" / "dolly.jsonl").open()]
    with path.open("w") as f:
        for i in range(ROWS):
            row, other = source[i % len(source)], rng.choice(source)
            extra = " ".join(other["response"].split()[:4])
            f.write(json.dumps({**row, "response": f"{row['response']} {extra}"}) + "\n")


def run(num_clients: int, data: Path, out: Path) -> dict:
    raw = {
        "name": f"scale{num_clients}",
        "output_dir": str(out),
        "model": {"name_or_path": str(REPO / "data" / "tiny-llama")},
        "data": {"source": "dolly", "path": str(data), "holdout": 0},
        "partition": {"kind": "iid"},
        "federation": {"num_clients": num_clients, "clients_per_round": 2, "rounds": 20, "local_steps": 2},
        "lora": {"r": 8, "alpha": 16},
        "train": {"batch_size": 2, "max_length": 96, "optimizer_state": "persist"},
        "checkpoint": {"keep_last": 1},
    }
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(raw)],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000, 10000])
    args = parser.parse_args()
    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.jsonl"
        make_rows(data)
        for n in args.clients:
            m = run(n, data, Path(tmp) / f"runs{n}")
            m["round_median_s"] = statistics.median(m["round_s"])
            m["setup_s"] = m["total_s"] - m["loop_s"]
            measured[n] = m
            print(
                f"{n:>6} clients: peak RSS {m['peak_rss_mib']:.1f} MiB, round {m['round_median_s']:.3f} s "
                f"(median of {len(m['round_s'])}), setup {m['setup_s']:.1f} s, "
                f"client state on disk {m['client_state_on_disk_bytes'] / 2**20:.2f} MiB",
                flush=True,
            )
    first, last = measured[args.clients[0]], measured[args.clients[-1]]
    print("\n| clients | peak RSS | round time (median) | setup | client state on disk |")
    print("|---|---|---|---|---|")
    for n, m in measured.items():
        print(
            f"| {n:,} | {m['peak_rss_mib']:.1f} MiB | {m['round_median_s'] * 1000:.0f} ms "
            f"| {m['setup_s']:.1f} s | {m['client_state_on_disk_bytes'] / 2**20:.2f} MiB |"
        )
    print(
        f"\n{args.clients[-1]:,} vs {args.clients[0]:,} clients: memory "
        f"{last['peak_rss_mib'] / first['peak_rss_mib']:.3f}x, round time "
        f"{last['round_median_s'] / first['round_median_s']:.3f}x"
    )


if __name__ == "__main__":
    main()
