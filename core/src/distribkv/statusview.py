"""How ``distribkv status`` shows a :class:`~distribkv.clusterstatus.ClusterStatus`: aligned
plain text (a pipe, a file, a script), or a ``rich`` table on a terminal (colours, and
refreshed in place with ``--watch``). Both have the same columns and the same words, and no
cell has a space in it, so that ``awk`` splits a row into its columns: ``52.0KiB``, a lag of
``12/0.31s`` (entries/seconds), ``resync:40%@1,234keys/s``, ``differs:<fingerprint>``."""

from __future__ import annotations

import time
from typing import Any

from distribkv.clusterstatus import ClusterStatus, NodeStatus

__all__ = ["COLUMNS", "plain", "rich_view", "rows"]

COLUMNS = ["SHARD", "NODE", "ROLE", "ADDRESS", "STATE", "KEYS", "DISK", "LAG", "TERM", "MAP"]


def human_bytes(size: Any) -> str:
    if not isinstance(size, int):
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _lag(node: NodeStatus) -> str:
    if not node.up or node.role == "leader":
        return "-"
    replication = node.replication
    resync = replication.get("resync") or {}
    if resync.get("active"):
        copied, total = resync.get("keys_copied", 0), resync.get("keys_total")
        share = f"{min(copied / total, 1):.0%}" if total else f"{copied:,}keys"
        return f"resync:{share}@{resync.get('keys_per_s', 0):,.0f}keys/s"
    state = replication.get("state")
    if state in ("diverged", "retrying", "starting", "resyncing"):
        return state
    entries, seconds = replication.get("lag_entries"), replication.get("lag_seconds")
    if entries is None:
        return "-"
    return f"{entries:,}" + (f"/{seconds:g}s" if entries else "")


def rows(view: ClusterStatus) -> list[list[str]]:
    """The table's cells, header first."""
    out = [list(COLUMNS)]
    for node in view.nodes:
        status = node.status or {}
        keys = status.get("keys")
        term = status.get("term")
        if node.fingerprint is None:
            agrees = "-"
        elif node.fingerprint == view.fingerprint:
            agrees = "ok"
        else:
            agrees = f"differs:{node.fingerprint}"
        out.append(
            [
                node.shard,
                node.name,
                node.role or "-",
                node.address,
                node.state,
                f"{keys:,}" if isinstance(keys, int) else "-",
                human_bytes(status.get("disk_bytes")),
                _lag(node),
                "-" if term is None else str(term),
                agrees,
            ]
        )
    return out


def summary(view: ClusterStatus) -> str:
    up = sum(node.up for node in view.nodes)
    if view.ok:
        return f"all {up} nodes up, maps agree ({view.fingerprint})"
    return f"{up} of {len(view.nodes)} nodes up; {len(view.problems)} problem(s):"


def plain(view: ClusterStatus) -> str:
    """Aligned text, ending with the summary and one line per problem."""
    table = rows(view)
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]
    lines.append(summary(view))
    lines += [f"  {problem}" for problem in view.problems]
    return "\n".join(lines)


_STATE_STYLES = {"up": "green", "down": "bold red", "error": "bold yellow"}


def rich_view(view: ClusterStatus, *, interval: float | None = None) -> Any:
    """A ``rich`` renderable: the table, the summary and the problems (and, when watching,
    when it was taken and how often it is refreshed)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    stamp = time.strftime("%H:%M:%S", time.localtime(view.taken_at))
    caption = f"{view.config_path} at {stamp}"
    if interval is not None:
        caption += f", every {interval:g}s (Ctrl-C stops)"
    table = Table(title=f"distribkv cluster {view.fingerprint}", caption=caption)
    header, *body = rows(view)
    for name in header:
        table.add_column(name, justify="right" if name in ("KEYS", "DISK", "TERM") else "left")
    for node, cells in zip(view.nodes, body, strict=True):
        styled: list[Any] = list(cells)
        styled[4] = Text(cells[4], style=_STATE_STYLES[node.state])
        if cells[9].startswith("differs"):
            styled[9] = Text(cells[9], style="bold red")
        if cells[7] in ("diverged", "retrying"):
            styled[7] = Text(cells[7], style="bold yellow")
        table.add_row(*styled)
    parts: list[Any] = [table, Text(summary(view), style="green" if view.ok else "bold red")]
    parts += [Text(f"  {problem}", style="red") for problem in view.problems]
    return Group(*parts)
