"""``distribkv bench --scale`` results as Markdown and as a chart over the key count (log x)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "markdown", "png", "rows", "table"]

COLUMNS = [
    "backend",
    "keys",
    "load keys/s",
    "GET uniform /s",
    "p99 ms",
    "GET zipfian /s",
    "p99 ms",
    "SET /s",
    "p99 ms",
    "disk B/key",
    "start-up s",
    "resync s",
    "resync keys/s",
    "reshard s/M keys",
]


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _keys(n: int) -> str:
    for power, suffix in ((9, "G"), (6, "M"), (3, "k")):
        if n >= 10**power and n % 10**power == 0:
            return f"{n // 10**power:,}{suffix}"
    return f"{n:,}"


def rows(results: dict[str, Any]) -> list[list[str]]:
    out = []
    for backend, run in results["runs"].items():
        for step in run["steps"]:
            cells = [backend, _keys(step["keys"]), _num(step["load_keys_per_s"])]
            for name in ("get-uniform", "get-zipfian", "set-uniform"):
                row = step["workloads"].get(name) or {}
                cells += [_num(row.get("rps")), _num((row.get("latency_ms") or {}).get("p99"), 2)]
            resync = step.get("resync") or {}
            cells += [
                _num(step["disk_bytes_per_key"]),
                _num(step["startup_s"], 2),
                _num(step.get("resync_s"), 1),
                _num(resync.get("keys_per_s")),
                _num(step.get("reshard_s_per_million"), 1),
            ]
            out.append(cells)
    return out


def table(results: dict[str, Any]) -> str:
    lines = [COLUMNS, *rows(results)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    )


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    m = meta["machine"]
    out = [
        "# distribkv bench --scale",
        "",
        f"`{meta['command']}` — {meta['started']}, {meta['duration_s']:.0f} s"
        + (" (nodes on CPU 0, wrk on CPU 1)" if meta.get("pin") else "")
        + ".",
        "",
        f"Machine: {m.get('cpus')} CPUs ({m.get('cpu', '?')}), Python {m.get('python')}."
        f" One node ({meta['server']}, durability `{meta['durability']}`,"
        f" {meta['threads']} threads), values of {meta['value_size']} random bytes, wrk"
        f" {meta['seconds']:g} s per figure with {meta['connections']} connections.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + " --- |" * len(COLUMNS),
        *("| " + " | ".join(line) + " |" for line in rows(results)),
        "",
        "Time per backend: "
        + ", ".join(f"{b} {run['seconds']:.0f} s" for b, run in results["runs"].items())
        + ".",
        "",
        "`load keys/s`: the client's `set_many` loading the keys added since the previous size;"
        " `disk B/key`: the node's data directory (data, a log of up to `log_retention` entries,"
        " metadata) after a restart, over the keys; `start-up s`: process start to `/healthz`"
        " answering; `resync`: a new empty replica, from its process start to its resync done;"
        " `reshard s/M keys`: `distribkv reshard` from 2 to 3 shards (ring) of a cluster that"
        " holds that many keys, seconds per million keys held (`-`: not measured at that size);"
        " p99 latencies are corrected for coordinated omission.",
        "",
    ]
    return "\n".join(out)


#: (panel title, y label, value of a step, log y)
PANELS = [
    ("GET uniform", "requests / s", lambda s: s["workloads"]["get-uniform"]["rps"], False),
    ("GET zipfian", "requests / s", lambda s: s["workloads"]["get-zipfian"]["rps"], False),
    ("SET uniform", "requests / s", lambda s: s["workloads"]["set-uniform"]["rps"], False),
    (
        "p99 of GET uniform",
        "ms (corrected)",
        lambda s: s["workloads"]["get-uniform"]["latency_ms"].get("p99"),
        True,
    ),
    ("disk per key", "bytes", lambda s: s["disk_bytes_per_key"], False),
    ("start-up to /healthz", "seconds", lambda s: s["startup_s"], False),
    ("resync of a new replica", "seconds", lambda s: s.get("resync_s"), True),
    (
        "reshard 2 -> 3 shards",
        "seconds per million keys",
        lambda s: s.get("reshard_s_per_million"),
        False,
    ),
]


def png(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5), constrained_layout=True)
    for axis, (title, label, value, log_y) in zip(axes.flat, PANELS, strict=True):
        for backend, run in results["runs"].items():
            points = [(s["keys"], value(s)) for s in run["steps"]]
            points = [(x, y) for x, y in points if y is not None]
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=backend)
        axis.set_xscale("log")
        if log_y:
            axis.set_yscale("log")
        else:
            axis.set_ylim(bottom=0)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("keys on the node")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3, which="both")
    axes.flat[0].legend(fontsize=8)
    meta = results["meta"]
    fig.suptitle(
        f"distribkv bench --scale: one node, {meta['value_size']}-byte values,"
        f" {meta['seconds']:g} s of wrk per point, {meta['machine'].get('cpus')} CPUs"
        + (", pinned" if meta.get("pin") else ""),
        fontsize=10,
    )
    fig.savefig(path, dpi=90)
    plt.close(fig)
