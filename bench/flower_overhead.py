"""Per-round overhead of fedalign on Flower against the in-process runtime, for the same recipe.

One recipe (embedded tiny Llama and data, 6 clients, 3 per round, 10 local steps, FedASK: two stages per
round), 3 rounds, run four ways in one go:

1. in-process (``fedalign sft``);
2. Flower's simulation engine, 3 virtual nodes (``fedalign flower simulate``);
3. Flower's deployment engine on 127.0.0.1 (a SuperLink, 3 SuperNodes, ``flwr run``), each message
   handled in Flower's fresh ClientApp process, which loads the model every time (``worker=false``);
4. the same with the nodes' long-lived workers (the default), which keep the model loaded.

It prints each path's median round wall time (the server's, ``private/client_metrics.jsonl``) and its
ratio to the in-process round, then the bytes on the wire against the bytes fedalign counts. Run it alone
on the machine:

    python bench/flower_overhead.py
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"


def recipe(output: Path) -> dict:
    return {
        "name": "bench",
        "seed": 0,
        "output_dir": str(output),
        "model": {"name_or_path": str(REPO / "data" / "tiny-llama")},
        "data": {
            "source": "dolly",
            "path": str(REPO / "data/quickstart/dolly.jsonl"),
            "max_rows": 600,
            "holdout": 60,
        },
        "federation": {"num_clients": 6, "clients_per_round": 3, "rounds": 3, "local_steps": 10},
        "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "algorithm": {"name": "fedask"},
        "train": {"batch_size": 8, "learning_rate": 5e-3, "max_length": 128},
        "eval": {"batch_size": 60, "every": 0},
    }


def round_times(run_dir: Path) -> list[float]:
    lines = (run_dir / "private" / "client_metrics.jsonl").read_text().splitlines()
    return [r["wall_s"] for r in map(json.loads, lines) if r["type"] == "round"]


def counted_bytes(run_dir: Path) -> tuple[int, int]:
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if r["type"] == "round"]
    return sum(r["bytes_up"] for r in rounds), sum(r["bytes_down"] for r in rounds)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deployed(raw: dict, work: Path, worker: bool) -> Path:
    """A SuperLink and 3 SuperNodes on loopback, the recipe submitted with flwr run; every process stopped."""
    import tomli_w

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}  # fmt: skip
    started: list[subprocess.Popen] = []

    def start(name: str, args: list[str]) -> subprocess.Popen:
        home = work / "homes" / name
        home.mkdir(parents=True, exist_ok=True)
        log = (work / f"{name}.log").open("w")
        process = subprocess.Popen(
            args,
            env={**env, "FLWR_HOME": str(home)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started.append(process)
        return process

    port = free_port()
    try:
        link = [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port)]
        start(
            "superlink",
            [*link, "--disable-runtime-dependency-installation", "--database", str(work / "l.db")],
        )
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        for node in range(3):
            clients = ",".join(str(c) for c in range(node, 6, 3))
            config = (
                f'clients="{clients}" state-dir="{work / "nodes" / f"n{node}"}" worker={str(worker).lower()}'
            )
            node_args = [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}"]
            start(f"node{node}", [*node_args, "--port", str(free_port()), "--node-config", config])
        cli = work / "homes" / "flwr"  # what start() gives the flwr process
        cli.mkdir(parents=True, exist_ok=True)
        (cli / "config.toml").write_text(
            f'[superlink]\ndefault = "d"\n\n[superlink.d]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        (work / "run.toml").write_text(
            tomli_w.dumps({"recipe": json_to_yaml(raw), "task": "sft", "nodes": 3})
        )
        start("flwr", [str(BIN / "flwr"), "run", str(REPO / "flower-app"), "d", "--stream", "--run-config",
                       str(work / "run.toml")])  # fmt: skip
        deadline = time.monotonic() + 1800
        while not list(Path(raw["output_dir"]).glob("*/private/flower_wire.json")):
            if time.monotonic() > deadline:
                raise SystemExit(f"the deployed run did not finish; see {work}")
            time.sleep(1)
        return next(Path(raw["output_dir"]).glob("*/private/flower_wire.json")).parents[1]
    finally:
        for pid_file in (work / "nodes").glob("*/worker.pid"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
        for process in reversed(started):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in started:
            process.wait(timeout=30)


def json_to_yaml(raw: dict) -> str:
    from fedalign.recipe import validate_recipe

    return validate_recipe(raw).resolved_yaml()


def main() -> None:
    from rich.console import Console

    from fedalign.flower.simulate import simulate
    from fedalign.recipe import validate_recipe
    from fedalign.runtime.sft import run_sft

    quiet = Console(file=io.StringIO())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runs: dict[str, Path] = {}
        raw = recipe(root / "local")
        runs["in-process"] = run_sft(validate_recipe(raw), quiet).run_dir
        raw = recipe(root / "sim")
        runs["Flower simulation (3 nodes)"] = simulate(
            validate_recipe(raw), "sft", 3, root / "sim-nodes", quiet
        ).run_dir
        for worker in (False, True):
            name = "with the node worker" if worker else "fresh process per message"
            raw = recipe(root / f"deploy-{worker}")
            runs[f"Flower deployment, {name}"] = deployed(raw, root / f"work-{worker}", worker)
        base = statistics.median(round_times(runs["in-process"]))
        print(f"{'path':55s} {'rounds (s)':>28s} {'median':>8s} {'ratio':>8s}")
        for name, run_dir in runs.items():
            times = round_times(run_dir)
            shown = ", ".join(f"{t:.2f}" for t in times)
            median = statistics.median(times)
            print(f"{name:55s} {shown:>28s} {median:8.2f} {median / base:7.1f}x")
        run_dir = runs["Flower deployment, with the node worker"]
        wire = json.loads((run_dir / "private" / "flower_wire.json").read_text())
        up, down = counted_bytes(run_dir)
        print(f"bytes up: {wire['bytes_up']:,} on the wire vs {up:,} counted; "
              f"down: {wire['bytes_down']:,} vs {down:,} counted")  # fmt: skip


if __name__ == "__main__":
    main()
