"""FedASK's server step against FedAvg-LoRA's at Llama-2-7B shapes: time and peak memory, in one run.

64 LoRA modules of 4096×4096 (q_proj and v_proj of 32 layers), r = 16, 10 clients with random uploads.
The server side of a round only: FedAvg sums the clients' A and B with weights and replaces the global
factors; FedASK sums the Y sketches, QR-factorises them (stage 1), then sums the P sketches and rebuilds B
and A by SVD (stage 2). Client-side sketching is not timed. Each algorithm runs in a fresh process whose
peak resident memory above its inputs is reported.

    python bench/fedask_server.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, statistics, sys, time
import psutil, torch
torch.set_num_threads(2)
from fedalign.algorithms import build, registry, weighted_sum
name, repeats = sys.argv[1], int(sys.argv[2])
d = k = 4096; r, modules, clients = 16, 64, 10
g = torch.Generator().manual_seed(0)
def key(i, f): return f"base_model.model.model.layers.{i // 2}.self_attn.{'qv'[i % 2]}_proj.lora_{f}.weight"
glob = {}
for i in range(modules):
    glob[key(i, "A")] = torch.randn(r, k, generator=g) / k ** 0.5
    glob[key(i, "B")] = torch.zeros(d, r)
algorithm = build(registry()[name].config_class())
glob = algorithm.init_global(glob)
weights = [1.0 / clients] * clients
base_b = {key(i, "B"): torch.randn(d, r, generator=g) * 0.01 for i in range(modules)}
clients_trained = [{**glob, **{k_: v * (1 + 0.1 * c) for k_, v in base_b.items()}} for c in range(clients)]
# Every client's uploads for both stages, made before timing (client-side work).
stage0 = [algorithm.client_upload(0, 0, t, {}, None) for t in clients_trained]
stage1 = []
if algorithm.num_stages == 2:
    reply = algorithm.server_step(0, 0, weighted_sum(stage0, weights), glob)
    stage1 = [algorithm.client_upload(1, 0, t, reply, None) for t in clients_trained]
rss_inputs = psutil.Process().memory_info().rss
times = []
for _ in range(repeats):
    started = time.perf_counter()
    algorithm.server_step(0, 0, weighted_sum(stage0, weights), glob)
    if stage1:
        algorithm.server_step(1, 0, weighted_sum(stage1, weights), glob)
    times.append(time.perf_counter() - started)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": statistics.median(times), "peak_above_inputs_mib": (peak - rss_inputs) / 2**20}))
"""


def run(name: str, repeats: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, name, str(repeats)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    fedavg, fedask = run("fedavg", args.repeats), run("fedask", args.repeats)
    print(
        f"FedAvg-LoRA server step: {fedavg['seconds']:.3f} s, peak +{fedavg['peak_above_inputs_mib']:.0f} MiB"
    )
    print(
        f"FedASK server steps:     {fedask['seconds']:.3f} s, peak +{fedask['peak_above_inputs_mib']:.0f} MiB"
    )
    print(f"ratio FedASK / FedAvg: {fedask['seconds'] / fedavg['seconds']:.2f}x time")


if __name__ == "__main__":
    main()
