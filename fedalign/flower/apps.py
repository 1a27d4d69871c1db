"""fedalign's Flower ServerApp and ClientApp (Message API).

``server_app()`` runs :func:`fedalign.flower.server.run_on_flower` in Flower's ServerApp; ``client_app()``
answers its messages on a node with :class:`fedalign.flower.node.NodeRuntime`:

- ``query.hello``: the clients this node hosts (from its own ``--node-config``) and, where the recipe
  needs them, their row counts;
- ``train.visit``: train the sampled clients on the broadcast; their first-stage uploads;
- ``train.stage``: a later stage's uploads (FedASK), from the visits kept on the node's disk;
- ``query.commit``: the server's decisions on the last rounds (which visits became clients' state).

A node's failure travels as the exception's class name only: its message may quote the node's data, and
stays in the node's log. The module-level ``server``/``client`` objects are what a Flower app's
``pyproject.toml`` names (``fedalign.flower.apps:server`` / ``:client``); the recipe then comes from the
run config (``recipe``, the resolved YAML; ``task``; ``nodes``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

if TYPE_CHECKING:  # the ClientApp's process stays light: it only forwards to the node's worker
    from fedalign.recipe import Recipe

log = logging.getLogger("fedalign.flower")


def _task(name: str) -> Any:
    if name == "sft":
        from fedalign.runtime.sft import SFTTask

        return SFTTask()
    from fedalign.runtime.dpo import DPOTask

    return DPOTask()


def _recipe(text: str) -> Recipe:
    from fedalign.recipe import validate_recipe

    return validate_recipe(yaml.safe_load(text), "run config: recipe")


def server_app(recipe: Recipe | None = None, task: str | None = None, nodes: int | None = None) -> ServerApp:
    """A ServerApp running ``recipe`` (or the run config's) over ``nodes`` nodes; its result (a
    :class:`RunResult`) or its error is kept on the app as ``app.result`` / ``app.error`` (for
    ``fedalign flower simulate``, whose engine only logs a ServerApp's error)."""
    app = ServerApp()
    app.result, app.error = None, None  # type: ignore[attr-defined]

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedalign.flower.server import DEFAULT_TIMEOUT_S, run_on_flower

        config = context.run_config
        run_recipe = recipe or _recipe(str(config["recipe"]))
        name = task or str(config.get("task", "sft"))
        wanted = nodes or int(config.get("nodes", 1))
        timeout = float(config.get("node-timeout-s", DEFAULT_TIMEOUT_S))
        try:
            app.result = run_on_flower(
                run_recipe, _task(name), grid, str(context.run_id), wanted, node_timeout_s=timeout
            )  # type: ignore[attr-defined]
        except BaseException as error:
            app.error = error  # type: ignore[attr-defined]
            raise

    return app


def handle(
    message_type: str, content: RecordDict, node_config: dict[str, Any], state_root: Path | None
) -> RecordDict:
    """A message's reply content on this node (in the ClientApp's process, or in the node's worker)."""
    import torch

    from fedalign.flower.node import NodeSettings, runtime_for
    from fedalign.flower.wire import decode, encode

    try:
        fields = content.config_records["run"]
        recipe = _recipe(str(fields["recipe"]))
        settings = NodeSettings.parse(node_config, recipe.federation.num_clients, state_root)
        node = runtime_for(recipe, _task(str(fields["task"])), settings, str(fields["run-key"]))
        if "through-round" in fields:  # the server's decisions on earlier rounds, before anything else
            finished = zip(fields["finished-rounds"], fields["finished-clients"], strict=True)
            node.commit([(int(r), int(c)) for r, c in finished], int(fields["through-round"]))
        if message_type.startswith("train."):  # the server's public plan, before any training
            node.plan(float(fields["sigma"]) if "sigma" in fields else None)
        if message_type == "query.hello":
            sizes = node.sizes()
            hello: dict[str, Any] = {"clients": sorted(sizes)}
            if bool(fields["want-sizes"]):
                hello["sizes"] = [sizes[c] for c in sorted(sizes)]
            return RecordDict({"hello": ConfigRecord(hello)})
        if message_type == "query.commit":
            return RecordDict({"status": ConfigRecord({"node": "ok"})})
        round_idx, clients = int(fields["round"]), [int(c) for c in fields["clients"]]
        _test_hold(message_type, round_idx, settings.state_dir)
        if message_type == "train.visit":
            expected = node.expected_broadcast(round_idx)
            received = decode(content.array_records["received"], expected, "the broadcast")
            outcomes: dict[int, Any] = node.train(round_idx, clients, received)
        elif message_type == "train.stage":
            record = content.array_records["reply"]
            reply = {k: torch.from_numpy(record[k].numpy().copy()) for k in record}
            outcomes = node.stage(round_idx, int(fields["stage"]), clients, reply)
        else:
            raise ValueError(f"unknown message type {message_type!r}")
    except Exception as error:
        log.exception("fedalign node: %s failed", message_type)
        return RecordDict({"status": ConfigRecord({"node": type(error).__name__})})
    reply_content = RecordDict()
    status, steps = {}, {}
    for client, outcome in outcomes.items():
        if isinstance(outcome, str):
            status[str(client)] = outcome
            continue
        status[str(client)] = "ok"
        upload = outcome[0] if isinstance(outcome, tuple) else outcome
        if isinstance(outcome, tuple):
            steps[str(client)] = outcome[1]
        reply_content[f"upload.{client}"] = encode(upload)
    reply_content["status"] = ConfigRecord(status)
    if message_type == "train.visit":
        reply_content["steps"] = ConfigRecord(steps)
    return reply_content


def _test_hold(message_type: str, round_idx: int, state_dir: Path) -> None:
    """A node that hangs (``FEDALIGN_TEST_HOLD=train.visit:2``: on round 2's visit message), for the tests
    that kill a SuperNode in the middle of a round; it says so in ``<state-dir>/held``."""
    if os.environ.get("FEDALIGN_TEST_HOLD") == f"{message_type}:{round_idx + 1}":
        import time

        (state_dir / "held").write_text(str(os.getpid()))
        time.sleep(3600)


def client_app(state_root: Path | None = None) -> ClientApp:
    """A ClientApp; ``state_root``: where simulated nodes keep their state (``node-<partition-id>/``).

    A node with a ``state-dir`` (a deployed SuperNode) hands each message to its long-lived worker
    (:mod:`.worker`, started by the first message), which keeps the model loaded: Flower starts a fresh
    ClientApp process per message, which would otherwise load it every time. ``worker=false`` in the
    node config handles messages in the ClientApp's own process instead."""
    app = ClientApp()

    def answer(msg: Message, context: Context) -> Message:
        node_config = dict(context.node_config)
        message_type = msg.metadata.message_type
        try:
            if "state-dir" in node_config and node_config.get("worker", True) not in (False, "false"):
                from fedalign.flower.worker import forward

                content = forward(Path(str(node_config["state-dir"])), message_type, msg.content, node_config)
            else:
                content = handle(message_type, msg.content, node_config, state_root)
        except Exception as error:  # its text may name the node's paths: it stays in the node's log
            log.exception("fedalign node: %s failed", message_type)
            content = RecordDict({"status": ConfigRecord({"node": type(error).__name__})})
        return Message(content, reply_to=msg)

    for action in ("hello", "commit"):
        app.query(action)(answer)
    for action in ("visit", "stage"):
        app.train(action)(answer)
    return app


server = server_app()
client = client_app()
