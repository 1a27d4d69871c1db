"""The components `flwr run` loads: fedalign's ServerApp and ClientApp (fedalign.flower.apps)."""

from fedalign.flower.apps import client, server

__all__ = ["client", "server"]
