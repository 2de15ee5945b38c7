"""The NBD benchmark's arithmetic and report (the runs themselves are `make bench`)."""

from __future__ import annotations

from benchmarks import bench_nbd


def _row(iops: float) -> dict[str, float]:
    return {"iops": iops, "mb_per_s": iops * 4096 / 1e6, "p50_ms": 1.0, "p99_ms": 2.0}


def test_ratios_and_goals_in_the_report() -> None:
    jobs = [name for name, _ in bench_nbd.JOBS]
    results = {
        "replicator-pair": {job: _row(100.0 * (index + 1)) for index, job in enumerate(jobs)},
        "replicator-single": {job: _row(300.0) for job in jobs},
        "nbdkit-file-fua": {job: _row(400.0) for job in jobs},
    }
    ratios = bench_nbd.ratios(results)
    assert ratios["replicator-pair"] == {job: round(100.0 * (i + 1) / 400.0, 3) for i, job in enumerate(jobs)}
    assert set(ratios["replicator-single"].values()) == {0.75}
    document = {"date": "d", "fio": "fio-x", "runtime_s": 1, "results": results, "ratios": ratios}
    text = bench_nbd.report(document)
    for job, goal in bench_nbd.GOALS.items():
        value = ratios["replicator-pair"][job]
        assert f"- {job}: {value} (goal >= {goal}: {'met' if value >= goal else 'NOT met'})" in text
    assert text.count("| replicator-pair |") == len(jobs)
