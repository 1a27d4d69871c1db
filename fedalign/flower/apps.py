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
from typing import Any

import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedalign.recipe import Recipe, validate_recipe

log = logging.getLogger("fedalign.flower")


def _task(name: str) -> Any:
    if name == "sft":
        from fedalign.runtime.sft import SFTTask

        return SFTTask()
    from fedalign.runtime.dpo import DPOTask

    return DPOTask()


def _recipe(text: str) -> Recipe:
    return validate_recipe(yaml.safe_load(text), "run config: recipe")


def server_app(recipe: Recipe | None = None, task: str | None = None, nodes: int | None = None) -> ServerApp:
    """A ServerApp running ``recipe`` (or the run config's) over ``nodes`` nodes; its result (a
    :class:`RunResult`) or its error is kept on the app as ``app.result`` / ``app.error`` (for
    ``fedalign flower simulate``, whose engine only logs a ServerApp's error)."""
    app = ServerApp()
    app.result, app.error = None, None  # type: ignore[attr-defined]

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedalign.flower.server import run_on_flower

        config = context.run_config
        run_recipe = recipe or _recipe(str(config["recipe"]))
        name = task or str(config.get("task", "sft"))
        wanted = nodes or int(config.get("nodes", 1))
        try:
            app.result = run_on_flower(run_recipe, _task(name), grid, str(context.run_id), wanted)  # type: ignore[attr-defined]
        except BaseException as error:
            app.error = error  # type: ignore[attr-defined]
            raise

    return app


def client_app(state_root: Path | None = None) -> ClientApp:
    """A ClientApp; ``state_root``: where simulated nodes keep their state (``node-<partition-id>/``)."""
    app = ClientApp()

    def runtime(msg: Message, context: Context):
        from fedalign.flower.node import NodeSettings, runtime_for

        fields = msg.content.config_records["run"]
        recipe = _recipe(str(fields["recipe"]))
        root = state_root or (
            Path(os.environ["FEDALIGN_NODE_STATE"]) if "FEDALIGN_NODE_STATE" in os.environ else None
        )
        settings = NodeSettings.parse(dict(context.node_config), recipe.federation.num_clients, root)
        node = runtime_for(recipe, _task(str(fields["task"])), settings, str(fields["run-key"]))
        finished = (
            list(zip(fields["finished-rounds"], fields["finished-clients"], strict=True))
            if "finished-rounds" in fields
            else []
        )
        if "through-round" in fields:
            node.commit([(int(r), int(c)) for r, c in finished], int(fields["through-round"]))
        if msg.metadata.message_type.startswith("train."):  # the server's public plan, before any training
            node.plan(float(fields["sigma"]) if "sigma" in fields else None)
        return node, fields

    def failed(msg: Message, error: Exception) -> Message:
        log.exception("fedalign node: %s failed", msg.metadata.message_type)
        return Message(RecordDict({"status": ConfigRecord({"node": type(error).__name__})}), reply_to=msg)

    @app.query("hello")
    def hello(msg: Message, context: Context) -> Message:
        try:
            node, fields = runtime(msg, context)
            sizes = node.sizes()
            hello = {"clients": sorted(sizes)}
            if bool(fields["want-sizes"]):
                hello["sizes"] = [sizes[c] for c in sorted(sizes)]
            return Message(RecordDict({"hello": ConfigRecord(hello)}), reply_to=msg)
        except Exception as error:
            return failed(msg, error)

    @app.train("visit")
    def visit(msg: Message, context: Context) -> Message:
        from fedalign.flower.wire import decode, encode

        try:
            node, fields = runtime(msg, context)
            round_idx = int(fields["round"])
            received = decode(
                msg.content.array_records["received"], node.expected_broadcast(round_idx), "the broadcast"
            )
            outcomes = node.train(round_idx, [int(c) for c in fields["clients"]], received)
        except Exception as error:
            return failed(msg, error)
        content = RecordDict()
        status, steps = {}, {}
        for client, outcome in outcomes.items():
            if isinstance(outcome, str):
                status[str(client)] = outcome
                continue
            upload, steps[str(client)] = outcome
            status[str(client)] = "ok"
            content[f"upload.{client}"] = encode(upload)
        content["status"] = ConfigRecord(status)
        content["steps"] = ConfigRecord(steps)
        return Message(content, reply_to=msg)

    @app.train("stage")
    def stage(msg: Message, context: Context) -> Message:
        import torch

        from fedalign.flower.wire import encode

        try:
            node, fields = runtime(msg, context)
            record = msg.content.array_records["reply"]
            reply = {k: torch.from_numpy(record[k].numpy().copy()) for k in record}
            outcomes = node.stage(
                int(fields["round"]), int(fields["stage"]), [int(c) for c in fields["clients"]], reply
            )
        except Exception as error:
            return failed(msg, error)
        content = RecordDict()
        status = {}
        for client, outcome in outcomes.items():
            status[str(client)] = outcome if isinstance(outcome, str) else "ok"
            if not isinstance(outcome, str):
                content[f"upload.{client}"] = encode(outcome)
        content["status"] = ConfigRecord(status)
        return Message(content, reply_to=msg)

    @app.query("commit")
    def commit(msg: Message, context: Context) -> Message:
        try:
            runtime(msg, context)
        except Exception as error:
            return failed(msg, error)
        return Message(RecordDict({"status": ConfigRecord({"node": "ok"})}), reply_to=msg)

    return app


server = server_app()
client = client_app()
