"""fedalign on Flower (issue 14): the same recipe on Flower nodes gives the in-process run's adapter and
privacy ledgers, and nothing but the algorithm's uploads and public fields leaves a node.

The simulation tests run Flower's own simulation engine (Ray workers, Flower's messages, the nodes' own
state); the deployment test (``test_flower_deployment.py``) runs a real SuperLink and SuperNodes."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from rich.console import Console
from safetensors.torch import load_file

from fedalign.errors import RecipeError
from fedalign.flower.node import NodeSettings
from fedalign.flower.simulate import simulate
from fedalign.flower.wire import WireError, decode, encode
from fedalign.recipe import validate_recipe
from fedalign.runtime.sft import run_sft

from .conftest import small_recipe


def _console() -> Console:
    return Console(file=io.StringIO(), width=200)


def flower_recipe(tmp_path: Path, algorithm: str, unit: str) -> dict:
    raw = small_recipe(tmp_path)
    raw["data"] |= {"max_rows": 80, "holdout": 10}
    raw["federation"] |= {"num_clients": 4, "clients_per_round": 3, "rounds": 2, "local_steps": 1}
    raw["train"]["batch_size"] = 4
    raw["algorithm"] = {"name": algorithm}
    raw["eval"]["every"] = 0
    raw["privacy"] = {"unit": unit, "target_epsilon": 8.0, "delta": 1e-3, "randomness": "seeded"}
    if unit == "client":
        raw["privacy"] |= {"noise_multiplier": 0.5, "target_epsilon": None}
        raw["federation"]["weighting"] = "uniform"
    return raw


def _ledgers(path: Path) -> dict:
    return json.loads(path.read_text())


def _same_tensors(a: Path, b: Path) -> None:
    left, right = load_file(a), load_file(b)
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=1e-5, atol=1e-6)


def _same_adapter(a: Path, b: Path) -> None:
    _same_tensors(a / "adapter" / "adapter_model.safetensors", b / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize(
    ("algorithm", "unit"),
    [("fedask", "example"), ("fedavg", "client")],
    ids=["fedask-example-dp-noise-on-nodes", "fedavg-client-dp-noise-on-server"],
)
def test_simulation_matches_in_process_and_sends_only_uploads(
    tmp_path: Path, algorithm: str, unit: str
) -> None:
    recipe = validate_recipe(flower_recipe(tmp_path, algorithm, unit))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as Flower's workers (one CPU each): the same float reduction order
    try:
        local = run_sft(recipe, _console())
    finally:
        torch.set_num_threads(threads)
    nodes_dir = tmp_path / "nodes"
    flower = simulate(recipe, "sft", 3, nodes_dir, _console())

    _same_adapter(local.run_dir, flower.run_dir)
    public = [json.loads(line) for line in (flower.run_dir / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (local.run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [{k: v for k, v in r.items() if k != "wall_s"} for r in public if r["type"] == "round"]
    assert rounds == [
        {k: v for k, v in r.items() if k != "wall_s"} for r in reference if r["type"] == "round"
    ]
    summary = next(r for r in public if r["type"] == "summary")
    # row counts crossed only where the recipe needs them (example DP accounting), and the run says so
    assert ("row count" in summary["guarantee"]) == (unit == "example")
    assert summary["epsilon"] == pytest.approx(
        local.run_dir and next(r for r in reference if r["type"] == "summary")["epsilon"]
    )

    # every node's clients: state and ledgers on the node, never in the server's run directory
    node_roots = sorted(nodes_dir.glob("node-*/run-*"))
    assert len(node_roots) == 3
    assert not any((flower.run_dir / "private" / "clients").glob("client-*"))
    if unit == "example":  # the ledgers: in-process == the server's copy == the nodes' own, merged
        in_process = _ledgers(local.run_dir / "private" / "privacy_ledgers.json")
        assert _ledgers(flower.run_dir / "private" / "privacy_ledgers.json") == in_process
        merged: dict = {}
        for root in node_roots:
            merged |= _ledgers(root / "privacy_ledgers.json")
        assert merged == in_process
        losses = [
            json.loads(line)
            for root in node_roots
            for line in (root / "metrics.jsonl").read_text().splitlines()
        ]
        assert losses and all(r["type"] == "client" and r["loss"] is not None for r in losses)

    # the wire: what every reply held, as Flower delivered it
    wire = json.loads((flower.run_dir / "private" / "flower_wire.json").read_text())
    stages = {"train.visit": "_Y" if algorithm == "fedask" else None, "train.stage": "_P"}
    assert sum(r["type"] == "query.hello" for r in wire["replies"]) == 3  # discovery is inspected too
    for reply in wire["replies"]:
        assert reply["metrics"] == {}, reply
        if reply["type"] == "query.hello":
            assert set(reply["configs"]) == {"hello"}
            sent = set(reply["configs"]["hello"])
            assert sent == ({"clients", "sizes"} if unit == "example" else {"clients"})
            assert not reply["arrays"]
            continue
        if reply["type"] == "query.commit":
            assert reply["configs"] == {"status": {"node": "ok"}} and not reply["arrays"]
            continue
        assert reply["type"] in stages
        allowed_configs = {"status", "steps"} if reply["type"] == "train.visit" else {"status"}
        assert set(reply["configs"]) == allowed_configs
        assert set(reply["configs"]["status"].values()) == {"ok"}
        if "steps" in reply["configs"]:
            assert set(reply["configs"]["steps"].values()) == {recipe.federation.local_steps}
        assert reply["arrays"] and all(name.startswith("upload.") for name in reply["arrays"])
        for keys in reply["arrays"].values():
            suffix = stages[reply["type"]]
            if suffix is None:  # FedAvg: the trained factors, nothing else
                assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
            else:
                assert keys and all(k.endswith(suffix) for k in keys), keys
    assert wire["bytes_up"] > 0 and wire["bytes_down"] > 0


def test_wire_refuses_wrong_missing_extra_key_or_shape() -> None:
    good = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.zeros(3, 2)}
    expected = {k: tuple(v.shape) for k, v in good.items()}
    assert decode(encode(good), expected, "x").keys() == good.keys()
    missing = encode({"m.lora_A.weight": good["m.lora_A.weight"]})
    with pytest.raises(WireError, match=r"client 1's upload: refused, missing m\.lora_B\.weight"):
        decode(missing, expected, "client 1's upload")
    extra = encode({**good, "loss": torch.ones(1)})
    with pytest.raises(WireError, match="unexpected loss"):
        decode(extra, expected, "client 1's upload")
    with pytest.raises(WireError, match=r"m.lora_A.weight has shape \(3, 2\), expected \(2, 3\)"):
        decode(encode({**good, "m.lora_A.weight": torch.ones(3, 2)}), expected, "u")
    ints = ArrayRecord(
        {
            **{k: Array(v.numpy()) for k, v in good.items()},
            "m.lora_B.weight": Array(np.ones((3, 2), dtype=np.int64)),
        }
    )
    with pytest.raises(WireError, match="int64, expected floating point"):
        decode(ints, expected, "u")


def test_node_settings_from_node_config(tmp_path: Path) -> None:
    settings = NodeSettings.parse({"clients": "0,3", "state-dir": str(tmp_path)}, 4)
    assert settings.clients == (0, 3) and settings.state_dir == tmp_path
    assert NodeSettings.parse({"partition-id": 1, "num-partitions": 2}, 5, tmp_path).clients == (1, 3)
    with pytest.raises(RecipeError, match=r"each must be in 0\.\.3"):
        NodeSettings.parse({"clients": "4", "state-dir": "x"}, 4)
    with pytest.raises(RecipeError, match="needs state-dir"):
        NodeSettings.parse({"clients": "1"}, 4)
    with pytest.raises(RecipeError, match="exactly one client"):
        NodeSettings.parse({"clients": "1,2", "state-dir": "x", "data-path": "d.jsonl"}, 4)


class LoopbackMessenger:
    """Flower's messages (the same ``RecordDict`` contents, copied as a transport would) delivered to nodes
    in this process: the whole protocol (wire checks, pending visits, commits, node state on disk) without
    Flower's engines, so that every algorithm can be checked cheaply against the in-process run."""

    def __init__(self, node_configs: dict[int, dict]) -> None:
        self.node_configs = node_configs
        self.grid = self

    def connected(self) -> list[int]:
        return sorted(self.node_configs)

    def node_ids(self, wanted: int, timeout: float) -> list[int]:
        return self.connected()

    def send(self, message_type, contents, timeout):
        from fedalign.flower.apps import handle

        return {
            node: handle(message_type, copy.deepcopy(content), self.node_configs[node], None)
            for node, content in contents.items()
        }


@pytest.mark.parametrize("algorithm", ["scaffold", "fedsa", "rolora", "ffa", "fedprox", "fedask"])
def test_every_algorithm_over_the_message_protocol_matches_in_process(tmp_path: Path, algorithm: str) -> None:
    """Client state (SCAFFOLD's variates, FedSA's B, persisted optimizer moments) kept on the nodes and
    committed through the protocol gives the in-process adapter, bit for bit (one process, one thread
    count)."""
    from fedalign.flower.server import flower_preparation
    from fedalign.runtime.run import run_federated
    from fedalign.runtime.sft import SFTTask

    raw = flower_recipe(tmp_path, algorithm, "none")
    raw["federation"] |= {"rounds": 3}
    raw["train"]["optimizer_state"] = "persist"
    recipe = validate_recipe(raw)
    local = run_sft(recipe, _console())
    configs = {
        101: {"clients": "0,3", "state-dir": str(tmp_path / "n0")},
        202: {"clients": "1", "state-dir": str(tmp_path / "n1")},
        303: {"clients": "2", "state-dir": str(tmp_path / "n2")},
    }
    prepare = flower_preparation(LoopbackMessenger(configs), f"loop-{algorithm}", 3)
    flower = run_federated(recipe, SFTTask(), _console(), prepare=prepare)
    left = load_file(local.run_dir / "adapter" / "adapter_model.safetensors")
    right = load_file(flower.run_dir / "adapter" / "adapter_model.safetensors")
    assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)
    states = sorted(p.name for p in tmp_path.glob("n*/run-*/clients/client-*.safetensors"))
    assert states == sorted(
        p.name for p in (local.run_dir / "private" / "clients").glob("client-*.safetensors")
    )
    assert not list(tmp_path.glob("n*/run-*/pending/round-*"))  # every visit decided and committed


def test_a_node_with_its_own_data_file_hosts_one_client_on_all_of_it(tmp_path: Path) -> None:
    """``data-path`` in a node's config: that file, all of it, is its one client's data (the recipe's
    holdout still held out); the server learns only the row counts it needs to weight by examples."""
    from fedalign.flower.server import flower_preparation
    from fedalign.runtime.run import run_federated
    from fedalign.runtime.sft import SFTTask

    from .conftest import QUICKSTART_DATA

    rows = (
        json.loads(QUICKSTART_DATA.read_text())
        if QUICKSTART_DATA.suffix == ".json"
        else [json.loads(line) for line in QUICKSTART_DATA.read_text().splitlines() if line.strip()]
    )
    own = []
    for index, size in enumerate((30, 50)):
        path = tmp_path / f"org{index}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[index * 100 : index * 100 + size]))
        own.append(path)
    raw = flower_recipe(tmp_path, "fedavg", "none")
    raw["data"] |= {"holdout": 0.1}
    raw["data"].pop("max_rows")
    raw["federation"] |= {"num_clients": 2, "clients_per_round": 2, "rounds": 1}
    configs = {
        11: {"clients": "0", "state-dir": str(tmp_path / "a"), "data-path": str(own[0])},
        22: {"clients": "1", "state-dir": str(tmp_path / "b"), "data-path": str(own[1])},
    }
    messenger = LoopbackMessenger(configs)
    prepare = flower_preparation(messenger, "own-data", 2)
    result = run_federated(validate_recipe(raw), SFTTask(), _console(), prepare=prepare)
    manifest = json.loads((result.run_dir / "partition.json").read_text())
    assert manifest["transport"] == "flower" and manifest["row_counts_sent"] is True
    wire = json.loads((result.run_dir / "private" / "flower_wire.json").read_text())
    said = {r["node"]: r["configs"]["hello"] for r in wire["replies"] if r["type"] == "query.hello"}
    assert said == {11: {"clients": [0], "sizes": [27]}, 22: {"clients": [1], "sizes": [45]}}
    visits = [
        json.loads(line)
        for root in (tmp_path / "a", tmp_path / "b")
        for line in next(root.glob("run-*")).joinpath("metrics.jsonl").read_text().splitlines()
    ]
    assert sorted(v["client"] for v in visits if v["type"] == "client") == [0, 1]
