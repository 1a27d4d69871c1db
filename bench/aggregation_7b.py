"""Every registered aggregation rule's server side at Llama-2-7B shapes: time, peak memory and bytes moved.

64 LoRA modules of 4096×4096 (q_proj and v_proj of 32 layers), r = 16, 10 clients, float32, 2 torch
threads. For each algorithm in ``fedalign.algorithms.registry()`` one round is driven through the protocol
exactly as the runtime drives it (``fedalign.runtime.federation`` / ``clients``): ``init_global``,
``broadcast``, per client ``local_start`` on a fresh ``ClientState`` (so SCAFFOLD's variates and FedSA-LoRA's
local B are the real ones), a simulated local update of the ``trainable`` factors, then per stage every
client's ``client_upload`` and the server's ``server_step`` on the weighted sum (its reply feeding the next
stage). All uploads are made before timing (client-side work). Timed, median over repeats: the server's
work only, ``begin_aggregation``, the weighted sum of each stage's uploads, ``server_step`` for every stage
and, for an algorithm that moves the base weights (FRLoRA), ``take_base_update``; one untimed round first.

Peak memory: each algorithm runs in a fresh process; its peak resident set during that first server round,
minus the resident set once all uploads exist (the high-water mark is reset there first where Linux allows
it, so set-up peaks are not counted). Bytes per client per round: up, the sum over stages of one client's
upload; down, the broadcast plus every stage's reply (plus the base-move factors for FRLoRA, which a client
on another machine needs and the in-process runtime does not count); both against the information floor,
one float32 adapter: r·(d+k)·4 bytes per module. Why: the algorithms' costs differ by protocol (extra
stages, control variates, personal factors, base moves), and the server step is what grows with the
number of clients and modules.

FRLoRA's one-time start (``init_from_base``: an SVD of every 4096×4096 base weight, minutes each on two
busy threads) runs with ``torch.linalg.svd`` replaced by random orthonormal rank-r factors of the right
shapes, unless ``--real-svd``; a round's figures depend on shapes only. Its line says so.

    python bench/aggregation_7b.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import psutil
import torch

from fedalign.algorithms import (
    Algorithm,
    ClientState,
    RunContext,
    Tensors,
    build,
    payload_bytes,
    registry,
    select,
    weighted_sum,
)
from fedalign.algorithms.base import DOWN, UP, low_rank_delta
from fedalign.runtime.metrics import PeakMemory

RANK, CLIENTS, THREADS = 16, 10, 2
LORA_ALPHA = 2.0 * RANK  # LoRA scale α/r = 2 (FRLoRA's c); the figures do not depend on it
MIB = 2**20


def module_name(i: int) -> str:
    return f"base_model.model.model.layers.{i // 2}.self_attn.{'qv'[i % 2]}_proj"


def key(i: int, factor: str) -> str:
    return f"{module_name(i)}.lora_{factor}.weight"


def floor_bytes(dim: int, modules: int) -> int:
    """One float32 LoRA adapter, A (r×k) and B (d×r) of every module: the least a round can move."""
    return RANK * (dim + dim) * 4 * modules


@contextmanager
def principal_factors_without_svd(rank: int) -> Iterator[None]:
    """``torch.linalg.svd`` returning random orthonormal rank-``rank`` factors (U d×r, S r, Vh r×k): what
    FRLoRA's ``init_from_base`` keeps of the SVD (its top r triplets), without the O(dk·min(d, k)) cost."""

    def fake(weight: torch.Tensor, full_matrices: bool = True) -> tuple[torch.Tensor, ...]:
        d, k = weight.shape
        g = torch.Generator().manual_seed(d * 7919 + k)
        u = torch.linalg.qr(torch.randn(d, rank, generator=g)).Q
        vh = torch.linalg.qr(torch.randn(k, rank, generator=g)).Q.T.contiguous()
        return u, torch.linspace(float(rank), 1.0, rank), vh

    with mock.patch.object(torch.linalg, "svd", fake):
        yield


def measure(name: str, repeats: int, dim: int, modules: int, real_svd: bool) -> dict[str, Any]:
    """One algorithm's round, in this (fresh) process."""
    torch.set_num_threads(THREADS)
    d = k = dim
    notes: list[str] = []
    g = torch.Generator().manual_seed(0)
    initial: Tensors = {}
    for i in range(modules):
        initial[key(i, "A")] = torch.randn(RANK, k, generator=g) / k**0.5
        initial[key(i, "B")] = torch.zeros(d, RANK)
    context = RunContext(num_clients=CLIENTS, clients_per_round=CLIENTS, local_steps=10, learning_rate=5e-4)
    algorithm: Algorithm = build(registry()[name].config_class(), context)

    dense_move_s: float | None = None
    if algorithm.moves_base:  # as run.py: the start adapter and the base change from the pretrained weights
        scalings = {module_name(i): LORA_ALPHA / RANK for i in range(modules)}
        started = time.perf_counter()
        if real_svd:
            base = {module_name(i): torch.randn(d, k, generator=g) / k**0.5 for i in range(modules)}
            initial, base_change = algorithm.init_from_base(base, initial, scalings)
            notes.append(f"one-time init_from_base (real SVDs): {time.perf_counter() - started:.1f} s")
        else:
            base = {module_name(i): torch.zeros(1, 1).expand(d, k) for i in range(modules)}
            with principal_factors_without_svd(RANK):
                initial, base_change = algorithm.init_from_base(base, initial, scalings)
            notes.append(
                "one-time init_from_base ran with random orthonormal rank-r factors in place of the SVD of "
                f"each {d}x{k} base weight (--real-svd runs it; a round's figures depend on shapes only)"
            )
        del base, base_change  # the base change goes to the clients' base (slots.add_to_base), not kept
    glob = algorithm.init_global(initial)

    # The round, client side, as LocalClients does it: broadcast, local_start on the client's state, local
    # training (simulated: every trainable tensor moves), then each stage's upload; all before timing.
    round_idx = 0
    weights = [1.0 / CLIENTS] * CLIENTS
    received = algorithm.broadcast(round_idx, glob)
    trainable = algorithm.trainable(round_idx)
    states = [ClientState() for _ in range(CLIENTS)]
    trained: list[Tensors] = []
    noise: Tensors = {}  # one local update, scaled per client
    for c, state in enumerate(states):
        adapter = {**glob, **algorithm.local_start(round_idx, received, state)}
        moved = select(adapter, trainable)
        noise = noise or {k_: torch.randn(v.shape, generator=g) * 0.01 for k_, v in moved.items()}
        trained.append({**adapter, **{k_: v + noise[k_] * (1 + 0.1 * c) for k_, v in moved.items()}})
    uploads: list[list[Tensors]] = []
    replies: list[Tensors] = []
    reply: Tensors = {}
    algorithm.begin_aggregation(round_idx, CLIENTS)
    for stage in range(algorithm.num_stages):
        uploads.append(
            [
                algorithm.client_upload(stage, round_idx, t, reply, s)
                for t, s in zip(trained, states, strict=True)
            ]
        )
        if stage < algorithm.num_stages - 1:
            reply = algorithm.server_step(stage, round_idx, weighted_sum(uploads[stage], weights), glob)
            replies.append(reply)
    up = sum(payload_bytes(stage_uploads[0]) for stage_uploads in uploads)
    down = payload_bytes(received) + sum(payload_bytes(r) for r in replies)

    def server_round() -> Tensors:
        algorithm.begin_aggregation(round_idx, CLIENTS)
        for stage in range(algorithm.num_stages):
            result = algorithm.server_step(stage, round_idx, weighted_sum(uploads[stage], weights), glob)
            del result  # a reply (sent on) or the new global adapter (kept by the runtime, freed here)
        return algorithm.take_base_update() if algorithm.moves_base else {}

    # A first round, untimed (first calls into LAPACK and the allocator cost extra), gives the peak; the
    # timed rounds follow it.
    rss_inputs = psutil.Process().memory_info().rss
    memory = PeakMemory(torch.device("cpu"))  # the runtime's own peak: VmHWM, reset here where Linux allows
    reset = memory.field == "peak_rss_mib"
    memory.reset()
    base_update = server_round()
    peak = memory.read() * MIB
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        base_update = server_round()
        times.append(time.perf_counter() - started)
    if not reset:
        notes.append("peak may include set-up (resident high-water mark could not be reset)")

    if algorithm.moves_base:
        move = payload_bytes(base_update)
        down += move
        notes.append(
            f"down includes the base-move factors ({move / MIB:.1f} MiB, take_base_update), which a client "
            "on another machine needs and the in-process runtime's bytes_down leaves out"
        )
        started = time.perf_counter()  # the dense W += up @ down: clients.move_base, not the server's work
        for module in [k_.removesuffix(UP) for k_ in base_update if k_.endswith(UP)]:
            low_rank_delta({module + UP: base_update[module + UP], module + DOWN: base_update[module + DOWN]})
        dense_move_s = time.perf_counter() - started
        notes.append(
            f"not in server s: the dense base move up @ down (clients.move_base; once per round in process, "
            f"on every client across machines): {dense_move_s:.3f} s"
        )
    if algorithm.trainable(round_idx) != algorithm.trainable(round_idx + 1):
        factors = ", ".join(sorted(f for f in trainable if f != "full"))
        notes.append(f"the trained factor alternates by round; round {round_idx} measured ({factors} trains)")
    return {
        "seconds": statistics.median(times),
        "peak_above_inputs_mib": (peak - rss_inputs) / MIB,
        "up": up,
        "down": down,
        "stages": algorithm.num_stages,
        "notes": notes,
    }


def run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", name, "--repeats", str(args.repeats)]
    command += ["--dim", str(args.dim), "--modules", str(args.modules)] + (
        ["--real-svd"] if args.real_svd else []
    )
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        return {"error": last[:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dim", type=int, default=4096, help="d = k of every module (4096: Llama-2-7B)")
    parser.add_argument("--modules", type=int, default=64, help="LoRA modules (64: q and v of 32 layers)")
    parser.add_argument("--real-svd", action="store_true", help="FRLoRA's one-time start with real SVDs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.repeats, args.dim, args.modules, args.real_svd)))
        return

    floor = floor_bytes(args.dim, args.modules)
    names = sorted(registry(), key=lambda n: (n != "fedavg", n))
    print(
        f"{args.modules} modules {args.dim}x{args.dim}, r={RANK}, {CLIENTS} clients, float32, "
        f"{THREADS} threads, median of {args.repeats}; "
        f"floor r(d+k)*4 B x {args.modules} = {floor / MIB:.2f} MiB per client"
    )
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        res = results[name] = run(name, args)
        if "error" in res:
            print(f"{name:9s} not measured: {res['error']}", flush=True)
            continue
        line = (
            f"{name:9s} server {res['seconds']:.4f} s, peak +{res['peak_above_inputs_mib']:.0f} MiB, "
            f"up {res['up'] / MIB:.2f} MiB ({res['up'] / floor:.2f}x floor), "
            f"down {res['down'] / MIB:.2f} MiB ({res['down'] / floor:.2f}x floor), {res['stages']} stage(s)"
        )
        print("; ".join([line, *res["notes"]]), flush=True)

    print()
    print("| algorithm | server s | peak MiB | up MiB (×floor) | down MiB (×floor) |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        res = results[name]
        if "error" in res:
            print(f"| {name} | n/a | n/a | n/a | n/a |")
            continue
        print(
            f"| {name} | {res['seconds']:.4f} | {res['peak_above_inputs_mib']:.0f} | "
            f"{res['up'] / MIB:.2f} ({res['up'] / floor:.2f}×) | "
            f"{res['down'] / MIB:.2f} ({res['down'] / floor:.2f}×) |"
        )
    print()
    fedavg, fedask = results.get("fedavg", {}), results.get("fedask", {})
    if "seconds" in fedavg and "seconds" in fedask:
        print(f"ratio FedASK / FedAvg: {fedask['seconds'] / fedavg['seconds']:.2f}x server time")
    else:
        print("ratio FedASK / FedAvg: n/a (one of them was not measured)")


if __name__ == "__main__":
    main()
