#!/usr/bin/env python3
"""A screenshot of the cluster page (``GET /ui``) of a cluster under load: the picture in the
README.

It launches a cluster of three shards with a replica each (LMDB) on loopback hosts of its
own, runs a few client threads against it (sets and gets, with a rate that rises and falls, so
that the chart has a shape), opens the page in headless chromium for ``--seconds``, and saves
the page as it is then. ``--down NODE`` kills one node (``shard-2/replica-0``, say) by its PID
a while before the picture, to show how a node that is down looks.

    .venv/bin/python tools/ui_screenshot.py [--seconds 120] [--down shard-2/replica-0] \\
        [--out docs/ui.png]

Needs Debian's chromium and chromium-driver (``apt-get install chromium chromium-driver``)
and selenium (``pip install 'distribkv[test]'``).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

from distribkv.client import Client, ClientError
from distribkv.testing.cluster import Cluster, allocate_hosts, wait_until, write_config

THREADS = 4
KEYS = 5000


def load(addresses: list[str], stop: threading.Event, started: float, peak: float) -> None:
    """Sets and gets at a rate that follows a slow wave between a fifth of ``peak`` and
    ``peak`` requests per second (over every thread)."""
    client = Client(addresses, timeout=5.0)
    n = 0
    try:
        while not stop.is_set():
            elapsed = time.monotonic() - started
            rate = peak * (0.6 + 0.4 * math.sin(elapsed / 15.0)) / THREADS
            key = b"user:%d" % (n * 7919 % KEYS)
            try:
                if n % 4 == 0:
                    client.set(key, os.urandom(64))
                else:
                    client.get(key)
            except (ClientError, OSError):
                pass  # a node that is down: the page shows it; the load goes on
            n += 1
            stop.wait(1.0 / rate)
    finally:
        client.close()


def browser(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        "--hide-scrollbars",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


def _inner_height(driver) -> int:
    """The height of the window's page area (the window less its frame)."""
    return int(driver.execute_script("return window.innerHeight"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="load before the picture")
    parser.add_argument("--rate", type=float, default=300.0, help="peak requests per second")
    parser.add_argument("--down", help="kill this node (SHARD/leader or SHARD/replica-N)")
    parser.add_argument("--out", type=Path, default=Path("docs/ui.png"))
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as work, allocate_hosts() as hosts:
        config = write_config(
            Path(work), hosts=hosts, shards=3, replicas={0: 1, 1: 1, 2: 1}, backend="lmdb"
        )
        with Cluster(config, "--max-restarts", "0") as cluster:
            if args.down and args.down not in cluster.nodes:
                parser.error(f"--down: no node {args.down!r} (nodes: {', '.join(cluster.nodes)})")
            addresses = [row["ADDRESS"] for row in cluster.nodes.values()]
            page = cluster.address("shard-0")
            stop = threading.Event()
            started = time.monotonic()
            threads = [
                threading.Thread(target=load, args=(addresses, stop, started, args.rate))
                for _ in range(THREADS)
            ]
            for thread in threads:
                thread.start()
            driver = browser(args.width, args.height)
            try:
                driver.get(f"http://{page}/ui")
                if args.down:
                    time.sleep(max(0.0, args.seconds - 20))
                    os.kill(int(cluster.nodes[args.down]["PID"]), signal.SIGKILL)
                    wait_until(
                        lambda: driver.execute_script(
                            "const r = document.querySelector(`tr[data-node='${arguments[0]}']`);"
                            " return r && r.dataset.state === 'down';",
                            args.down,
                        ),
                        30,
                        message=f"{args.down} shown down",
                    )
                remaining = args.seconds - (time.monotonic() - started)
                time.sleep(max(0.0, remaining))
                # The whole page, not the window: as tall as the page is.
                page_height = driver.execute_script("return document.body.scrollHeight")
                frame = args.height - _inner_height(driver)
                driver.set_window_size(args.width, page_height + frame)
                time.sleep(0.5)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(args.out))
            finally:
                driver.quit()
                stop.set()
                for thread in threads:
                    thread.join(timeout=10)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
