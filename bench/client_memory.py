"""Resident memory against the number of clients that are not training.

The same federated run (embedded tiny model and data, 2 clients per round, 20 rounds, optimizer state
persisted per client so every visited client has state to keep) with 10 and with 1,000 clients, each in a
fresh process; the peak resident set size of each is compared. fedalign keeps idle clients' state on disk,
so the figure must not grow with the client count. For scale: keeping one fp32 adapter copy per client in
memory, as OpenFedLLM does, costs (adapter bytes) x (clients) — printed alongside.

    python bench/client_memory.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import io, json, os, resource, sys
for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[v] = "1"
import torch
torch.set_num_threads(2)
from rich.console import Console
from fedalign.models.adapter import AdapterSlots
from fedalign.recipe import validate_recipe
from fedalign.runtime.sft import run_sft
raw = json.loads(sys.argv[1])
result = run_sft(validate_recipe(raw), Console(file=io.StringIO()))
adapter = sum(t.numel() * t.element_size() for t in AdapterSlots(result.model).read().values())
state = sum(f.stat().st_size for f in (result.run_dir / "private" / "clients").glob("*.safetensors"))
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "adapter_bytes": adapter, "client_state_on_disk_bytes": state}))
"""


def run(num_clients: int, out: Path) -> dict:
    raw = {
        "name": f"mem{num_clients}",
        "output_dir": str(out),
        "model": {"name_or_path": str(REPO / "data" / "tiny-llama")},
        "data": {"source": "dolly", "path": str(REPO / "data" / "quickstart" / "dolly.jsonl"), "holdout": 0},
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
    with tempfile.TemporaryDirectory() as tmp:
        small, large = run(10, Path(tmp) / "a"), run(1000, Path(tmp) / "b")
    adapter = small["adapter_bytes"]
    print(f"10 clients:    peak RSS {small['peak_rss_mib']:.1f} MiB")
    print(f"1000 clients:  peak RSS {large['peak_rss_mib']:.1f} MiB")
    print(f"ratio {large['peak_rss_mib'] / small['peak_rss_mib']:.3f}x; adapter {adapter / 2**20:.3f} MiB")
    on_disk = large["client_state_on_disk_bytes"] / 2**20
    print(f"client state kept on disk after the 1000-client run: {on_disk:.2f} MiB")
    print(f"an in-memory adapter copy per client would add {adapter * 1000 / 2**20:.1f} MiB at 1000 clients")


if __name__ == "__main__":
    main()
