"""The report folder of a run.

    summary.json        everything measured and every verdict (machine-readable)
    summary.md          the same for people
    history.jsonl       the clients' history (python -m chaos.check reads it)
    final-a.json/-b     both sites' final data
    site-events.jsonl   the split-brain checker's events (grants, role changes)
    logs/               witness.log, a.log, b.log (one JSON event a line)
    timeline.png        throughput and latency over time, fault windows shaded

To re-check offline:
    python -m chaos.check DIR/history.jsonl --final-a DIR/final-a.json --final-b DIR/final-b.json \
        --site-events DIR/site-events.jsonl
"""

from __future__ import annotations

import json
import shutil
import statistics
import struct
import zlib
from pathlib import Path
from typing import Any

PALETTE = [
    (228, 26, 28), (55, 126, 184), (77, 175, 74), (152, 78, 163), (255, 127, 0), (166, 86, 40),
    (247, 129, 191), (153, 153, 153), (0, 128, 128), (128, 128, 0), (0, 0, 128), (200, 160, 0),
    (60, 180, 200), (120, 40, 40), (40, 120, 40),
]
BUCKET_S = 0.5


def write(out: Path, summary: dict[str, Any], history: Any, finals: dict[str, Any] | None,
          events: list[dict[str, Any]], samples: list[Any], deployment: Any) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if history is not None:
        history.dump(out / "history.jsonl")
    if finals:
        for site, state in finals.items():
            (out / f"final-{site}.json").write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    with (out / "site-events.jsonl").open("w") as stream:
        for event in sorted(events, key=lambda e: e["time"]):
            stream.write(json.dumps(event) + "\n")
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    for name in ("witness", "a", "b"):
        path = deployment.log_path(name)
        if path.exists():
            shutil.copyfile(path, logs / f"{name}.log")
    try:
        summary["timeline"] = timeline_png(out / "timeline.png", summary, samples)
    except Exception as error:  # noqa: BLE001 - a missing picture must not hide the verdicts
        summary["timeline"] = f"not drawn: {error}"
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "summary.md").write_text(markdown(summary))


# ---------------------------------------------------------------- Markdown

def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.0f}"


def markdown(summary: dict[str, Any]) -> str:
    ops = summary["operations"]
    lines = [
        f"# Chaos run, seed {summary['seed']}: **{summary['status'].upper()}**",
        "",
        f"- plant: {summary['plant'] or 'none'}",
        f"- duration: {summary['duration_s']} s (workload {summary['workload_s']} s)",
        f"- operations: {ops['total']} ({ops['ok']} ok, {ops['fail']} fail, {ops['info']} info); "
        f"{ops['acknowledged_writes']} acknowledged writes/deletes",
        f"- faults: {summary['faults']['episodes']} episodes, {summary['faults']['injections']} injections",
        f"- run again: `{summary['rerun']}`",
        "",
        "## Checks",
        "",
        "| check | status | message |",
        "|---|---|---|",
    ]
    for check in summary["checks"]:
        message = str(check.get("message", "")).replace("|", "\\|").replace("\n", " ")[:300]
        lines.append(f"| {check['checker']} | {check['status']} | {message} |")
    if summary["harness_errors"]:
        lines += ["", "## Harness errors", ""] + [f"```\n{e}\n```" for e in summary["harness_errors"]]
    lines += [
        "",
        "## Per nemesis (ms)",
        "",
        "| nemesis | episodes | write RTO median | worst | read RTO median | worst | resyncs | resync median | worst "
        "| SYNC after heal median | worst |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in sorted(summary["per_nemesis"].items()):
        w, r, s, h = row["write_rto_ms"], row["read_rto_ms"], row["resync_ms"], row["sync_after_heal_ms"]
        lines.append(
            f"| {name} | {row['episodes']} | {_ms(w['median'])} | {_ms(w['worst'])} | {_ms(r['median'])} | "
            f"{_ms(r['worst'])} | {s['count']} | {_ms(s['median'])} | {_ms(s['worst'])} | {_ms(h['median'])} | "
            f"{_ms(h['worst'])} |"
        )
    lines += ["", "## Episodes", "", "| # | nemeses | details | write RTO ms | SYNC after heal ms | ops (ok/fail/info) |",
              "|---|---|---|---|---|---|"]
    for episode in summary["episodes"]:
        metrics = episode.get("metrics", {})
        details = "; ".join(
            ", ".join(f"{k}={v}" for k, v in d.items() if k != "nemesis" and v not in ("", None))
            for d in episode.get("details", [])
        )
        lines.append(
            f"| {episode['index']} | {' + '.join(episode['nemeses'])} | {details} | "
            f"{_ms(metrics.get('write_rto_ms'))} | {_ms(episode.get('sync_after_heal_ms'))} | "
            f"{metrics.get('ok', 0)}/{metrics.get('fail', 0)}/{metrics.get('info', 0)} |"
        )
    lines += ["", "![timeline](timeline.png)", ""]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the timeline

def _series(summary: dict[str, Any], samples: list[Any]) -> dict[str, Any]:
    origin = summary["time_origin_ns"]
    end = max([s.complete for s in samples], default=origin) - origin
    buckets = int(end / 1e9 / BUCKET_S) + 1
    ok = [0] * buckets
    bad = [0] * buckets
    latencies: list[list[float]] = [[] for _ in range(buckets)]
    for sample in samples:
        index = min(buckets - 1, max(0, int((sample.complete - origin) / 1e9 / BUCKET_S)))
        if sample.status == "ok":
            ok[index] += 1
            latencies[index].append((sample.complete - sample.invoke) / 1e6)
        else:
            bad[index] += 1
    windows = []
    for episode in summary["episodes"]:
        start = (episode["start_ns"] - origin) / 1e9
        healed = (episode.get("healed_ns", episode["start_ns"]) - origin) / 1e9
        synced = ((episode.get("synced_ns") or episode.get("end_ns") or episode["start_ns"]) - origin) / 1e9
        windows.append((start, healed, synced, "+".join(episode["nemeses"])))
    return {
        "t": [i * BUCKET_S for i in range(buckets)],
        "ok": [n / BUCKET_S for n in ok],
        "bad": [n / BUCKET_S for n in bad],
        "p50": [statistics.median(x) if x else None for x in latencies],
        "max": [max(x) if x else None for x in latencies],
        "windows": windows,
        "end": buckets * BUCKET_S,
    }


def timeline_png(path: Path, summary: dict[str, Any], samples: list[Any]) -> str:
    series = _series(summary, samples)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plain_png(path, series)
        return "pure-Python PNG writer (matplotlib not installed): no axes or labels"
    names = sorted({w[3] for w in series["windows"]})
    colours = {n: tuple(c / 255 for c in PALETTE[i % len(PALETTE)]) for i, n in enumerate(names)}
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(14, 7), sharex=True)
    for axis in (top, bottom):
        for start, healed, synced, name in series["windows"]:
            axis.axvspan(start, healed, color=colours[name], alpha=0.25, lw=0)
            axis.axvspan(healed, synced, color=colours[name], alpha=0.08, lw=0)
    top.step(series["t"], series["ok"], where="post", color="black", lw=0.8, label="ok ops/s")
    top.step(series["t"], series["bad"], where="post", color="red", lw=0.8, label="fail+info ops/s")
    top.set_ylabel("operations / s")
    bottom.plot(series["t"], [v if v is not None else float("nan") for v in series["p50"]], lw=0.8,
                color="tab:blue", label="median latency")
    bottom.plot(series["t"], [v if v is not None else float("nan") for v in series["max"]], lw=0.6,
                color="tab:orange", label="max latency")
    bottom.set_yscale("log")
    bottom.set_ylabel("latency (ms, ok ops)")
    bottom.set_xlabel("seconds since the workload started")
    from matplotlib.patches import Patch

    handles = [Patch(color=colours[n], alpha=0.4, label=n) for n in names]
    top.legend(loc="upper left", fontsize=7, ncol=2)
    bottom.legend(loc="upper left", fontsize=7)
    if handles:
        figure.legend(handles=handles, loc="upper right", fontsize=7, ncol=min(4, len(handles)),
                      title="faults (dark: injected, light: healing until SYNC)", title_fontsize=7)
    top.set_title(f"chaos run seed {summary['seed']} ({summary['status']})", loc="left")
    figure.tight_layout(rect=(0, 0, 1, 0.93))
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return "matplotlib"


def _plain_png(path: Path, series: dict[str, Any], width: int = 1200, height: int = 500) -> None:
    """Fallback: the same picture without text (bars: ok ops/s; dots: median latency; shading: faults)."""
    pixels = [[(255, 255, 255)] * width for _ in range(height)]
    end = series["end"] or 1.0

    def x_of(t: float) -> int:
        return min(width - 1, max(0, int(t / end * (width - 1))))

    half = height // 2
    for index, (start, healed, synced, _) in enumerate(series["windows"]):
        colour = PALETTE[index % len(PALETTE)]
        for x in range(x_of(start), x_of(synced) + 1):
            strength = 0.3 if x <= x_of(healed) else 0.12
            for y in range(height):
                r, g, b = pixels[y][x]
                pixels[y][x] = tuple(int(c * (1 - strength) + k * strength) for c, k in zip((r, g, b), colour, strict=False))
    peak = max(series["ok"] + series["bad"] + [1.0])
    for t, ok, bad in zip(series["t"], series["ok"], series["bad"], strict=False):
        x0, x1 = x_of(t), x_of(t + BUCKET_S)
        for x in range(x0, max(x0 + 1, x1)):
            for y in range(half - int(ok / peak * (half - 5)), half):
                pixels[y][x] = (30, 30, 30)
            for y in range(half - int(bad / peak * (half - 5)), half):
                pixels[y][x] = (220, 0, 0)
    import math

    top = max([v for v in series["max"] if v] + [1.0])
    for t, value in zip(series["t"], series["p50"], strict=False):
        if value:
            y = height - 1 - int(math.log10(1 + value) / math.log10(1 + top) * (half - 5))
            x = x_of(t)
            for dx in range(-1, 2):
                for dy in range(-1, 2):
                    if 0 <= x + dx < width and half <= y + dy < height:
                        pixels[y + dy][x + dx] = (0, 0, 200)
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    path.write_bytes(png)
