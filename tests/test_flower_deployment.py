"""fedalign on Flower's deployment engine (issue 14): a real SuperLink and three SuperNodes on 127.0.0.1,
each a separate process with its own Flower home, the app submitted with ``flwr run`` (the FAB of
``flower-app/``), every process stopped by its PID at the end.

FedASK with example-level DP (seeded noise, so that the runs can be compared) ends with the in-process
run's adapter and ledgers: the server's copy and each node's own."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
from rich.console import Console

from fedalign.recipe import validate_recipe
from fedalign.runtime.sft import run_sft

from .conftest import REPO
from .test_flower import _same_tensors, flower_recipe

BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # Flower starts its own executables
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }


def _wait_for(port: int, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"port {port} not open after {timeout} s:\n{log.read_text()[-3000:]}")


class Processes:
    """Every process the test starts, stopped by PID (SIGTERM, then SIGKILL) whatever happens."""

    def __init__(self, logs: Path, workers: Path) -> None:
        self.logs, self.started, self.workers = logs, [], workers
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"{name}.log"
        process = subprocess.Popen(
            args,
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            cwd=self.logs,
            start_new_session=True,
        )
        self.started.append(process)
        return process, log

    def stop(self) -> None:
        # the nodes' workers (started by their first message; each wrote its PID in its state dir)
        for pid_file in self.workers.glob("node-*/worker.pid"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
        for process in reversed(self.started):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.started:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def processes(tmp_path: Path):
    started = Processes(tmp_path / "logs", tmp_path / "nodes")
    yield started
    started.stop()
    assert all(p.poll() is not None for p in started.started)


def test_superlink_and_three_supernodes_match_in_process_and_survive_a_killed_node(
    tmp_path: Path, processes: Processes
) -> None:
    """FedASK with example-level DP (seeded noise, so that runs compare), every client in every round, 4
    rounds, on a real SuperLink and three SuperNodes (node 1 hosts client 1, node 0 clients 0 and 3).

    - Rounds 1-2: the global adapter and the ledgers (the server's copy and every node's own) equal the
      in-process run's after round 2 (its checkpoint).
    - Round 3: node 1 hangs on its visit; the test SIGKILLs its SuperNode and worker and starts it again on
      the same state dir. The round completes with the survivors after the node timeout (40 s: on 2 busy
      cores a live node's stage can take 20 s, which must not be taken for death), and the SuperLink keeps
      serving.
    - Round 4: the restarted node rejoins and trains client 1 from its own state: its ledger continues from
      rounds 1-2 (3 visits); the server's copy also counts round 3, when it could not know."""
    raw = flower_recipe(tmp_path, "fedask", "example")
    raw["federation"] |= {"clients_per_round": 4, "rounds": 4}
    recipe = validate_recipe(raw)
    local = run_sft(recipe, Console(file=io.StringIO()))

    port = _port()
    link, link_log = processes.start(
        "superlink",
        [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
         "--disable-runtime-dependency-installation", "--database", str(tmp_path / "link.db")],
        _env(tmp_path / "homes" / "link"),
    )  # fmt: skip
    _wait_for(port, link, link_log)
    nodes = tmp_path / "nodes"

    def supernode(node: int, clients: str, name: str, **extra: str) -> subprocess.Popen:
        config = f'clients="{clients}" state-dir="{nodes / f"node-{node}"}"'
        process, _ = processes.start(
            name,
            [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
             "--port", str(_port()), "--node-config", config],
            {**_env(tmp_path / "homes" / name), **extra},
        )  # fmt: skip
        return process

    supernode(0, "0,3", "supernode-0")
    held = supernode(1, "1", "supernode-1", FEDALIGN_TEST_HOLD="train.visit:3")
    supernode(2, "2", "supernode-2")
    cli_home = tmp_path / "homes" / "cli"
    cli_home.mkdir(parents=True)
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    run_config = tmp_path / "run-config.toml"
    config = {"recipe": recipe.resolved_yaml(), "task": "sft", "nodes": 3, "node-timeout-s": 40.0}
    run_config.write_text(tomli_w.dumps(config))
    submit, _ = processes.start(
        "flwr-run",
        [
            str(BIN / "flwr"),
            "run",
            str(REPO / "flower-app"),
            "deploy",
            "--stream",
            "--run-config",
            str(run_config),
        ],
        _env(cli_home),
    )

    def logs() -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(processes.logs.glob("*.log"))
        )

    marker = nodes / "node-1" / "held"
    deadline = time.monotonic() + 400
    while not marker.exists():
        assert time.monotonic() < deadline and submit.poll() in (None, 0), f"node 1 never held:\n{logs()}"
        time.sleep(0.5)
    # node 1 dies in the middle of round 3: its SuperNode (with what it started), and its worker
    os.killpg(held.pid, signal.SIGKILL)
    os.kill(int((nodes / "node-1" / "worker.pid").read_text()), signal.SIGKILL)
    held.wait()
    supernode(1, "1", "supernode-1-restarted")

    runs = Path(recipe.output_dir)
    deadline = time.monotonic() + 400
    # the run's last act: the nodes told the last rounds' outcome, and the wire summary written
    while not any((d / "private" / "flower_wire.json").is_file() for d in runs.glob("test-*")):
        assert time.monotonic() < deadline and submit.poll() in (None, 0), (
            f"the run did not finish:\n{logs()}"
        )
        time.sleep(1)
    (flower_dir,) = [d for d in runs.glob("test-*") if d != local.run_dir]

    # rounds 1-2: as in-process
    round_2 = Path("checkpoints") / "round-00002" / "global_adapter.safetensors"
    _same_tensors(local.run_dir / round_2, flower_dir / round_2)
    ledgers_2 = Path("private") / "checkpoints" / "round-00002.json"
    in_process = json.loads((local.run_dir / ledgers_2).read_text())["privacy"]["privacy_ledgers"]
    assert json.loads((flower_dir / ledgers_2).read_text())["privacy"]["privacy_ledgers"] == in_process

    public = [json.loads(line) for line in (flower_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = {r["round"]: r for r in public if r["type"] == "round"}
    assert [rounds[r]["clients"] for r in (1, 2, 3, 4)] == [
        [0, 1, 2, 3],
        [0, 1, 2, 3],
        [0, 2, 3],
        [0, 1, 2, 3],
    ]
    assert link.poll() is None  # the SuperLink kept serving
    dropped = [
        json.loads(line)
        for line in (flower_dir / "private" / "client_metrics.jsonl").read_text().splitlines()
    ]
    dropped = [r for r in dropped if r["type"] == "client_dropped"]
    assert [(r["round"], r["client"]) for r in dropped] == [(3, 1)] and "no answer" in dropped[0]["reason"]

    # the restarted node kept its state: client 1's ledger holds rounds 1, 2 and 4 (one step each)
    (node_run,) = list((nodes / "node-1").glob("run-*"))
    node_ledger = json.loads((node_run / "privacy_ledgers.json").read_text())["1"]
    assert sum(row[2] for row in node_ledger) == 3
    server_ledger = json.loads((flower_dir / "private" / "privacy_ledgers.json").read_text())["1"]
    assert sum(row[2] for row in server_ledger) == 4  # the server counted round 3: it could not know
    merged: dict = {}
    for root in sorted(nodes.glob("node-*/run-*")):
        merged |= json.loads((root / "privacy_ledgers.json").read_text())
    server = json.loads((flower_dir / "private" / "privacy_ledgers.json").read_text())
    assert {c: v for c, v in merged.items() if c != "1"} == {c: v for c, v in server.items() if c != "1"}
