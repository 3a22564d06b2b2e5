"""HTTP load with wrk: a Lua script per workload, and its result as a corrected histogram.

wrk's C event loop drives the node, so the generator is not the bottleneck (a Python client
tops out at a few thousand requests a second here). The script picks keys uniformly or from a
zipfian distribution (YCSB's generator, theta 0.99) and mixes GET /get with PUT /set.

Latency: wrk keeps a histogram of every response time. ``done()`` samples it at 1,099 quantiles;
they are recorded again into an HdrHistogram with ``record_corrected_value``, whose expected
interval is the mean time between one connection's requests (connections x duration /
requests). That adds the requests a closed-loop generator never sent while a slow response held
its connection: the correction for coordinated omission that HdrHistogram defines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

__all__ = ["QUANTILES", "WrkError", "corrected_percentiles", "lua_script", "run_wrk", "wrk_path"]

ZIPF_THETA = 0.99

# Quantiles sampled from wrk's histogram: fine where the tail is.
QUANTILES = (
    [round(0.1 * i, 3) for i in range(1, 991)]
    + [round(99 + 0.01 * i, 3) for i in range(1, 100)]
    + [round(99.99 + 0.001 * i, 3) for i in range(1, 11)]
)

LUA = """
-- distribkv bench: {name}
local n = {keys}
local keys_file = "{keys_file}"
local names = nil
local read_ratio = {read_ratio}
local zipf = {zipf}
local path = "{path}"
local value = string.rep("v", {value_size})
local theta = {theta}
local quantiles = {{{quantiles}}}
local zetan, alpha, eta, second
local counter = 0

setup = function(thread)
  counter = counter + 1
  thread:set("id", counter)
end

init = function(args)
  math.randomseed({seed} + 7919 * id)
  if keys_file ~= "" then
    names = {{}}
    for line in io.lines(keys_file) do names[#names + 1] = line end
    n = #names
  end
  if zipf then
    zetan = 0
    for i = 1, n do zetan = zetan + 1 / (i ^ theta) end
    local zeta2 = 1 + 1 / (2 ^ theta)
    alpha = 1 / (1 - theta)
    eta = (1 - (2 / n) ^ (1 - theta)) / (1 - zeta2 / zetan)
    second = 1 + 0.5 ^ theta
  end
end

local function pick()
  if not zipf then return math.random(0, n - 1) end
  local u = math.random()
  local uz = u * zetan
  if uz < 1 then return 0 end
  if uz < second then return 1 end
  local k = math.floor(n * (eta * u - eta + 1) ^ alpha)
  if k > n - 1 then k = n - 1 end
  return k
end

request = function()
  local key
  if names then key = names[pick() + 1] else key = "bench-" .. pick() end
  -- The reference endpoints (no-op, /healthz) get the same requests as a GET, key and all, so
  -- the generator's work and the request's size are the same and only the endpoint differs.
  if path ~= "" then return wrk.format("GET", path .. "?key=" .. key) end
  if read_ratio >= 1 or math.random() < read_ratio then
    return wrk.format("GET", "/get?key=" .. key)
  end
  return wrk.format("PUT", "/set?key=" .. key, nil, value)
end

done = function(summary, latency, requests)
  local e = summary.errors
  local parts = {{}}
  for i, p in ipairs(quantiles) do
    parts[i] = string.format("[%g, %d]", p, latency:percentile(p))
  end
  io.write(string.format(
    'DISTRIBKV-WRK {{"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {{"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}, ' ..
    '"min_us": %d, "max_us": %d, "mean_us": %.3f, "quantiles": [%s]}}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean, table.concat(parts, ", ")))
end
"""


class WrkError(RuntimeError):
    pass


def wrk_path() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise WrkError(
            "wrk is not installed; distribkv bench drives HTTP load with it:"
            " apt-get install wrk (Debian, Ubuntu)"
        )
    return found


def lua_script(
    name: str,
    *,
    keys: int,
    read_ratio: float = 1.0,
    zipf: bool = False,
    value_size: int = 100,
    path: str = "",
    seed: int = 1,
    keys_file: str = "",
) -> str:
    """``keys_file``: one key per line (URL-safe) to draw from instead of bench-0..keys-1."""
    return LUA.format(
        name=name,
        keys=keys,
        keys_file=keys_file,
        read_ratio=read_ratio,
        zipf="true" if zipf else "false",
        path=path,
        value_size=value_size,
        theta=ZIPF_THETA,
        quantiles=", ".join(f"{q:g}" for q in QUANTILES),
        seed=seed,
    )


def corrected_percentiles(result: dict[str, Any], connections: int) -> dict[str, float]:
    """p50/p95/p99/p99.9 in milliseconds, corrected for coordinated omission."""
    from hdrh.histogram import HdrHistogram

    total = result["requests"]
    if not total:
        return {}
    interval = max(1, round(connections * result["duration_us"] / total))
    histogram = HdrHistogram(1, 3_600_000_000, 3)
    recorded = 0
    for quantile, value in result["quantiles"]:
        upto = min(total, round(total * quantile / 100))
        if upto > recorded:
            histogram.record_corrected_value(max(1, int(value)), interval, upto - recorded)
            recorded = upto
    return {
        name: histogram.get_value_at_percentile(p) / 1000
        for name, p in (("p50", 50), ("p95", 95), ("p99", 99), ("p99.9", 99.9))
    }


def raw_percentiles(result: dict[str, Any]) -> dict[str, float]:
    """The same percentiles as wrk measured them (no correction), in milliseconds."""
    table = dict((q, v) for q, v in result["quantiles"])
    return {
        name: table.get(p, 0) / 1000
        for name, p in (("p50", 50.0), ("p95", 95.0), ("p99", 99.0), ("p99.9", 99.9))
    }


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: A command wrk runs under (``--pin``: taskset to CPU 1); empty: none.
WRK_PREFIX: list[str] = []


def run_wrk(
    url: str,
    script: str,
    *,
    seconds: float,
    connections: int,
    threads: int,
    server_pid: int | None,
    workdir: Path,
    name: str,
    timeout_s: float = 10.0,
) -> dict[str, Any]:
    """One wrk run; its result with the node's and wrk's CPU use (in cores) beside it (the
    node's only when its PID is known)."""
    script_path = workdir / f"{name}.lua"
    script_path.write_text(script)
    cmd = [
        wrk_path(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={timeout_s:g}s",
        "-s",
        str(script_path),
        url,
    ]
    server_before = _cpu_seconds(server_pid) if server_pid else 0.0
    children_before = _children_cpu()
    started = time.monotonic()
    process = subprocess.Popen(
        [*WRK_PREFIX, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = process.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise WrkError(f"wrk did not finish within {seconds + 60:.0f}s: {' '.join(cmd)}") from None
    elapsed = time.monotonic() - started
    server_cpu = _cpu_seconds(server_pid) - server_before if server_pid else None
    # wrk's CPU: the growth of the kernel's account of reaped children (no other child of
    # this process ends while wrk runs).
    wrk_cpu = _children_cpu() - children_before
    line = next((x for x in out.splitlines() if x.startswith("DISTRIBKV-WRK ")), None)
    if process.returncode != 0 or line is None:
        raise WrkError(f"wrk failed ({process.returncode}): {err.strip() or out.strip()}")
    result = json.loads(line.split(" ", 1)[1])
    result["elapsed_s"] = elapsed
    result["server_cpu"] = server_cpu / elapsed if server_cpu is not None else None
    result["wrk_cpu"] = wrk_cpu / elapsed
    return result


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
