"""A rolling restart of both sites under load raises no client error (issue 19, finding 40).

The procedure of docs/operations.md ("Upgrades and rolling restarts"): drain a site, stop it, start it
again, wait for SYNC; then the other. Four writers with the client's default retry policy write the
whole time; the benchmark (benchmarks/e2e/rolling.py) reads every acknowledged write back at both
sites afterwards. Stopped processes are stopped by the launcher, also on failure.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.e2e.rolling import measure_rolling_restart


def test_rolling_restart_with_drain_raises_no_client_error(tmp_path: Path) -> None:
    result = measure_rolling_restart(tmp_path / "deploy", writers=4, drain=True, progress=lambda line: None)
    assert result["lost_writes"] == 0, result["lost_samples"]
    assert result["client_errors"] == 0, result["client_error_samples"]
    assert result["writes_acked"] > 100
    assert [r["site"] for r in result["restarts"]] == ["b", "a"]
    # Each restart is seen as a failover by the peer (the pair goes on alone, then resyncs): the epoch moves.
    assert result["epoch_after"] > result["epoch_before"]
