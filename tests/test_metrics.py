"""What a run's metrics say: public records hold public fields only; peak memory is each span's own."""

import sys

import pytest

from fedalign.runtime.metrics import MetricsLog


def test_a_client_private_fact_cannot_be_written_to_the_public_metrics(tmp_path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl", tmp_path / "client_metrics.jsonl", unit="example")
    log.write({"type": "round", "round": 1, "clients": [0, 2], "epsilon_max": 0.5})
    with pytest.raises(ValueError, match="wall_s"):  # timing follows the secret Poisson draws
        log.write({"type": "round", "round": 2, "wall_s": 1.0})
    with pytest.raises(ValueError, match="loss"):
        log.write({"type": "round", "round": 2, "loss": 1.0})
    with pytest.raises(ValueError, match="client"):
        log.write({"type": "client", "round": 2})
    log.write_private({"type": "client", "round": 2, "loss": 1.0})
    log.close()
    assert "loss" not in (tmp_path / "metrics.jsonl").read_text()
    client_dp = MetricsLog(tmp_path / "c.jsonl", tmp_path / "c-private.jsonl", unit="client")
    with pytest.raises(ValueError, match="clients"):  # under client-level DP who took part is secret
        client_dp.write({"type": "round", "round": 1, "clients": [1], "epsilon": 0.3})
    client_dp.close()
    assert '"loss": 1.0' in (tmp_path / "client_metrics.jsonl").read_text()


def test_peak_memory_is_reset_for_each_span_and_its_field_says_what_it_is() -> None:
    """Measured in a fresh process: a long test session's own heap (memory freed but kept resident by the
    allocator, earlier peaks) must not decide what a 300 MiB span looks like."""
    import json
    import subprocess

    code = """
import json, torch
from fedalign.runtime.metrics import PeakMemory
memory = PeakMemory(torch.device("cpu"))
memory.reset()
before = memory.read()
block = bytearray(300 * 2**20)
block[:: 2**12] = b"x" * len(block[:: 2**12])  # touch every page
during = memory.read()
del block
memory.reset()
print(json.dumps({"field": memory.field, "before": before, "during": during, "after": memory.read()}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["field"] == (
        "peak_rss_mib" if sys.platform.startswith("linux") else "peak_rss_since_start_mib"
    )
    assert measured["during"] - measured["before"] > 250, measured
    if measured["field"] == "peak_rss_mib":  # the next span does not inherit the last one's peak
        assert measured["after"] < measured["during"] - 250, measured
