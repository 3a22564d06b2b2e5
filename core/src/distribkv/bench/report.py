"""The benchmark's results as a terminal table, Markdown, JSON and a PNG chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["markdown", "png", "table"]

COLUMNS = [
    "backend",
    "server",
    "workload",
    "rate",
    "x no-op",
    "x /healthz",
    "x in-proc",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "p99.9 ms",
    "errors",
    "node CPU",
    "wrk CPU",
]


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def rows_for_table(results: dict[str, Any]) -> list[list[str]]:
    out = []
    for row in results["rows"]:
        latency = row.get("latency_ms") or {}
        unit = " keys/s" if row.get("unit") == "keys/s" else ""
        out.append(
            [
                row["backend"],
                row["server"],
                row["workload"],
                _num(row["rps"]) + unit,
                _num(row.get("ratio_noop"), 2),
                _num(row.get("ratio_healthz"), 2),
                _num(row.get("ratio_raw"), 3),
                _num(latency.get("p50"), 2),
                _num(latency.get("p95"), 2),
                _num(latency.get("p99"), 2),
                _num(latency.get("p99.9"), 2),
                _num(row.get("errors")),
                _num(row.get("server_cpu"), 2),
                _num(row.get("wrk_cpu"), 2),
            ]
        )
    return out


def summary_rows(results: dict[str, Any]) -> list[list[str]]:
    """GET throughput per backend: each server, and granian over waitress."""
    by: dict[tuple[str, str], dict[str, float]] = {}
    for row in results["rows"]:
        by.setdefault((row["backend"], row["server"]), {})[row["workload"]] = row["rps"]
    backends = sorted({b for b, _ in by})
    servers = sorted({s for _, s in by})
    header = ["backend", *(f"{s} GET/s" for s in servers), *(f"{s} SET/s" for s in servers)]
    lines = [header]
    for backend in backends:
        line = [backend]
        for kind in ("get-uniform", "set-uniform"):
            for server in servers:
                line.append(_num(by.get((backend, server), {}).get(kind)))
        lines.append(line)
    if {"granian", "waitress"} <= set(servers):
        header.append("GET granian / waitress")
        for line, backend in zip(lines[1:], backends, strict=True):
            g = by.get((backend, "granian"), {}).get("get-uniform")
            w = by.get((backend, "waitress"), {}).get("get-uniform")
            line.append(f"{g / w:.2f}" if g and w else "-")
    return lines


FORWARDED_COLUMNS = ["backend", "server", "request", "owner/s", "forwarded/s", "forwarded / owner"]


def forwarded_rows(results: dict[str, Any]) -> list[list[str]]:
    """``get-forwarded``, ``set-forwarded``: the rate through the node that forwards, beside
    the owner's own in the same run."""
    by = {(r["backend"], r["server"], r["workload"]): r for r in results["rows"]}
    lines = []
    for row in results["rows"]:
        if row.get("ratio_owner") is None:
            continue
        kind = row["workload"].split("-", 1)[0]
        owner = by.get((row["backend"], row["server"], f"{kind}-owner"))
        lines.append(
            [
                row["backend"],
                row["server"],
                kind.upper(),
                _num(owner["rps"] if owner else None),
                _num(row["rps"]),
                _num(row["ratio_owner"], 2),
            ]
        )
    return lines


def _text_table(lines: list[list[str]], text_columns: int) -> str:
    """Left-aligned text columns, then right-aligned figures (the header too)."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for line in lines:
        out.append(
            "  ".join(
                cell.rjust(w) if i >= text_columns else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
        )
    return "\n".join(out)


METRICS_COLUMNS = [
    "backend",
    "server",
    "GET/s metrics on",
    "GET/s off",
    "on / off",
    "start order",
    "GET/CPU-s on",
    "GET/CPU-s off",
    "on / off (CPU)",
    "start order (CPU)",
    "rounds",
    "errors",
]


def metrics_rows(results: dict[str, Any]) -> list[list[str]]:
    """``--compare-metrics``: GET throughput with ``/metrics`` on and off, medians of the
    alternating rounds."""
    return [
        [
            row["backend"],
            row["server"],
            _num(row["on_rps"]),
            _num(row["off_rps"]),
            _num(row["ratio"], 3),
            _num(row.get("start_bias"), 3),
            _num(row["on_rps_per_cpu"]),
            _num(row["off_rps_per_cpu"]),
            _num(row["ratio_per_cpu"], 3),
            _num(row.get("start_bias_per_cpu"), 3),
            f"2 x {row['rounds']}",
            _num(row["errors"]),
        ]
        for row in results.get("metrics", [])
    ]


def table(results: dict[str, Any]) -> str:
    if results.get("metrics"):
        return _text_table([METRICS_COLUMNS, *metrics_rows(results)], 2)
    parts = [
        _text_table([COLUMNS, *rows_for_table(results)], 3),
        "",
        _text_table(summary_rows(results), 1),
    ]
    forwarded = forwarded_rows(results)
    if forwarded:
        parts += ["", _text_table([FORWARDED_COLUMNS, *forwarded], 3)]
    load = results.get("load_test")
    if load:
        parts += ["", load_test_line(load)]
    return "\n".join(parts)


def load_test_line(load: dict[str, Any]) -> str:
    return (
        f"load test: {load['keys']:,} random keys over {len(load['nodes'])} nodes"
        f" ({load['backend']}, {load['server']}, {load['concurrency']} threads):"
        f" {load['sets_per_s']:,.0f} sets/s, {load['gets_per_s']:,.0f} gets/s,"
        f" {load['errors']} errors, {load['mismatches']} wrong values"
    )


def _md_table(lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(lines[0]) + " |", "|" + " --- |" * len(lines[0])]
    out += ["| " + " | ".join(line) + " |" for line in lines[1:]]
    return "\n".join(out)


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    m = meta["machine"]
    lines = [
        "# distribkv bench",
        "",
        f"`{meta['command']}` — {meta['started']}, {meta['duration_s']:.0f} s.",
        "",
        f"Machine: {m.get('cpus')} CPUs ({m.get('cpu', '?')}), Python {m.get('python')},"
        f" {m.get('wrk', 'wrk')}. Profile `{meta['profile']}`: {meta['keys']:,} keys of"
        f" {meta['value_size']} bytes, {meta['seconds']:g} s per figure, {meta['connections']}"
        f" connections, durability `{meta['durability']}`, {meta['threads']} server threads;"
        + (
            " LevelDB and RocksDB compacted after the load (`POST /compact`)."
            if meta.get("compacted_after_load", False)
            else " no compaction after the load."
        ),
        "",
    ]
    if results.get("metrics"):
        lines += [
            "## GET with metrics on and off",
            "",
            _md_table([METRICS_COLUMNS, *metrics_rows(results)]),
            "",
            "Two nodes side by side, one with `[server] metrics = false`; wrk alternates"
            " between them (GET, uniform keys). Twice: once with the metrics node started"
            " first, once second; *on / off* is the geometric mean of the two sessions' ratios"
            " of medians, *start order* how much faster the node started first was (the"
            " control: what two nodes differ by for another reason than metrics).",
            "",
        ]
        return "\n".join(lines)
    lines += [
        "## GET and SET per backend and server",
        "",
        _md_table(summary_rows(results)),
        "",
        "## Every figure",
        "",
        _md_table([COLUMNS, *rows_for_table(results)]),
        "",
    ]
    forwarded = forwarded_rows(results)
    if forwarded:
        lines += [
            "## Forwarded requests",
            "",
            _md_table([FORWARDED_COLUMNS, *forwarded]),
            "",
            'Two shards with a replica each, `routing = "proxy"`: wrk sends every request to'
            " the node that does not own its key, which forwards it to the owner; the owner's"
            " own rate is measured in the same run.",
            "",
        ]
    if results.get("load_test"):
        lines += ["## Load test", "", load_test_line(results["load_test"]), ""]
    lines += [
        "Columns: `rate` is requests per second (keys per second for `batch-load`); `x no-op`"
        " divides it by a no-op endpoint on the same server in the same run, served the way a"
        " node's reads are (without WSGI where the server can, else by a bare WSGI app);"
        " `x /healthz` by the node's own cheapest route (same app, middleware and server), so it"
        " isolates what the operation itself costs; `x in-proc` by"
        " the same operations on the backend called in-process (one thread); latencies are"
        " corrected for coordinated omission; `node CPU` and `wrk CPU` are cores in use.",
        "",
    ]
    return "\n".join(lines)


def png(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r.get("unit") == "req/s"]
    if not rows:
        return  # nothing to draw (--compare-metrics)
    configs = sorted({(r["backend"], r["server"]) for r in rows})
    workloads = [w for w in dict.fromkeys(r["workload"] for r in rows)]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(13, 8.5), constrained_layout=True)
    width = 0.8 / max(1, len(configs))
    for n, config in enumerate(configs):
        by = {r["workload"]: r for r in rows if (r["backend"], r["server"]) == config}
        xs = [i + n * width for i in range(len(workloads))]
        top.bar(
            xs,
            [by[w]["rps"] if w in by else 0 for w in workloads],
            width,
            label=f"{config[0]} / {config[1]}",
        )
        bottom.bar(
            xs,
            [(by[w].get("latency_ms") or {}).get("p99", 0) if w in by else 0 for w in workloads],
            width,
        )
    ticks = [i + width * (len(configs) - 1) / 2 for i in range(len(workloads))]
    for axis in (top, bottom):
        axis.set_xticks(ticks, workloads, rotation=20)
        axis.grid(axis="y", alpha=0.3)
    top.set_ylabel("requests / s")
    top.set_title("distribkv bench: throughput of one node (no-op: the server's ceiling)")
    top.legend(ncol=3, fontsize=8)
    bottom.set_ylabel("p99 latency, ms (corrected)")
    bottom.set_yscale("log")
    meta = results["meta"]
    fig.suptitle(
        f"{meta['machine'].get('cpus')} CPUs, {meta['connections']} connections,"
        f" {meta['seconds']:g} s per bar, durability {meta['durability']}",
        fontsize=9,
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)
