"""The cluster page (``GET /ui``) in a real browser: Debian's chromium, headless, driven by
Selenium through chromium-driver, against a `distribkv launch` cluster of real nodes.

What the page shows is checked against each node's own ``/status``, and its throughput chart
draws a line once requests were made between two of its polls; a node killed by its PID
(the launcher runs with ``--max-restarts 0``, so it stays down) and a node that hangs (SIGSTOP:
its kernel still accepts connections, nothing answers) are shown as down within a bounded
wait, while the page keeps refreshing; when the node that serves the page goes, the page says
so and keeps its last view.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from distribkv.hashing.modulo import fnv1_64
from distribkv.testing.cluster import Cluster, Connection, call, q, wait_until, write_config

#: How long the page may take to show a change: a poll every 2 s, a gathering's deadline of
#: 1.5 s, and room for a busy machine.
SHOWN_WITHIN = 15.0


def _executable(name: str) -> str | None:
    return shutil.which(name) or (
        f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None
    )


@pytest.fixture
def browser():
    chromium, driver_path = _executable("chromium"), _executable("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip(
            "the cluster page's test needs Debian's chromium and chromium-driver"
            " (apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # --no-sandbox: chromium's sandbox cannot start as root in a container.
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(10)
    try:
        yield driver
    finally:
        driver.quit()


def rows(driver) -> dict[str, dict[str, str]]:
    """The nodes table as the page shows it: per node, its state and each cell by field."""
    return driver.execute_script(
        """
        const out = {};
        for (const tr of document.querySelectorAll('#nodes tbody tr')) {
          const row = {state: tr.dataset.state};
          for (const td of tr.querySelectorAll('td')) row[td.dataset.field] = td.textContent;
          out[tr.dataset.node] = row;
        }
        return out;
        """
    )


def shard_health(driver) -> dict[str, str]:
    return driver.execute_script(
        """
        const out = {};
        for (const card of document.querySelectorAll('#shards .shard'))
          out[card.dataset.shard] = card.querySelector('.health').textContent;
        return out;
        """
    )


def shown_at(driver) -> float:
    """The time of the view the page shows (it changes with every answered poll)."""
    return float(driver.execute_script("return document.body.dataset.at || 0"))


def line_pixels(driver) -> int:
    """Pixels of the throughput chart in the requests/s colour: its legend, and its line once
    it has one."""
    return driver.execute_script(
        """
        const canvas = document.getElementById('throughput');
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let n = 0;
        for (let i = 0; i < data.length; i += 4)
          if (data[i] === 0x2e && data[i + 1] === 0x6f && data[i + 2] === 0xdb) n += 1;
        return n;
        """
    )


def key_of(shard: int, n: int) -> bytes:
    """The ``n``-th key of ``page-*`` that shard ``shard`` of two owns (modulo hashing)."""
    found = 0
    for i in range(10_000):
        key = f"page-{i}".encode()
        if fnv1_64(key) % 2 == shard:
            if found == n:
                return key
            found += 1
    raise AssertionError("no key found")


def status(address: str) -> dict:
    return json.loads(call(address, "GET", "/status", timeout=5).body)


def test_the_page_shows_every_node_and_marks_dead_and_hung_nodes_down(
    tmp_path: Path, hosts, backend_name, browser
):
    config = write_config(tmp_path, hosts=hosts, shards=2, replicas={0: 1}, backend=backend_name)
    with Cluster(config, "--max-restarts", "0") as cluster:
        addresses = {name: row["ADDRESS"] for name, row in cluster.nodes.items()}
        pids = {name: int(row["PID"]) for name, row in cluster.nodes.items()}
        page = addresses["shard-0/leader"]
        # Different key counts per shard, so that a row showing another node's count fails.
        for shard, count in ((0, 7), (1, 4)):
            for n in range(count):
                key = key_of(shard, n)
                assert call(page, "PUT", f"/set?key={q(key)}", b"v", follow=1).status == 200
        last_seq = status(page)["replication"]["last_seq"]
        replica = addresses["shard-0/replica-0"]
        wait_until(
            lambda: status(replica)["replication"]["applied_seq"] == last_seq,
            10,
            message="the replica caught up",
        )

        browser.get(f"http://{page}/ui")
        assert browser.title == "distribkv cluster"
        wait_until(
            lambda: sum(r["state"] == "up" for r in rows(browser).values()) == 3,
            SHOWN_WITHIN,
            message="the page shows three nodes up",
        )
        shown = rows(browser)
        assert set(shown) == set(addresses)
        for name, address in addresses.items():
            own = status(address)
            assert shown[name]["address"] == address
            assert shown[name]["role"] == own["role"], name
            # LevelDB counts no keys: "n/a".
            assert shown[name]["keys"] == ("n/a" if own["keys"] is None else str(own["keys"])), name
            assert shown[name]["map"] == "agrees", name
        assert shown["shard-0/replica-0"]["lag"].startswith("0 ")
        assert shard_health(browser) == {"shard-0": "ok", "shard-1": "ok"}
        assert browser.find_element("id", "fingerprint").text == status(page)["fingerprint"]
        # Requests between two polls make a rate: the chart draws its line.
        legend_only = line_pixels(browser)
        key = key_of(1, 0)
        with Connection(addresses["shard-1/leader"]) as conn:
            for _ in range(200):
                assert conn.call("GET", f"/get?key={q(key)}").status == 200
        wait_until(
            lambda: float(rows(browser)["shard-1/leader"]["rps"] or 0) > 0,
            SHOWN_WITHIN,
            message="the page shows shard-1's requests per second",
        )
        assert browser.find_element("id", "charts").get_attribute("data-metrics") == "yes"
        assert browser.find_element("id", "metrics-note").text.startswith("now: ")
        wait_until(
            lambda: line_pixels(browser) > legend_only + 20,
            SHOWN_WITHIN,
            message="the throughput chart draws a line",
        )

        # A node killed by its PID: down, and its shard degraded.
        os.kill(pids["shard-0/replica-0"], signal.SIGKILL)
        wait_until(
            lambda: rows(browser)["shard-0/replica-0"]["state"] == "down",
            SHOWN_WITHIN,
            message="the killed replica is shown down",
        )
        assert shard_health(browser)["shard-0"] == "degraded"
        assert rows(browser)["shard-1/leader"]["state"] == "up"

        # A node that hangs: it accepts connections and never answers. The view still comes
        # within the gathering's deadline, with that node down, and the page keeps refreshing.
        hung = pids["shard-1/leader"]
        os.kill(hung, signal.SIGSTOP)
        try:
            wait_until(
                lambda: rows(browser)["shard-1/leader"]["state"] == "down",
                SHOWN_WITHIN,
                message="the hung leader is shown down",
            )
            # The call's timeout (1 s), or the gathering's deadline (1.5 s) on a busy machine.
            error = rows(browser)["shard-1/leader"]["error"]
            assert "timed out" in error or "no answer within" in error, error
            assert shard_health(browser)["shard-1"] == "no leader"
            started = time.monotonic()
            view = call(page, "GET", "/ui/data", timeout=10)
            assert view.status == 200
            assert time.monotonic() - started < 5.0  # the deadline is 1.5 s
            before = shown_at(browser)
            wait_until(lambda: shown_at(browser) > before, SHOWN_WITHIN, message="refreshes")
            assert rows(browser)["shard-0/leader"]["state"] == "up"
            browser.save_screenshot(str(tmp_path / "ui.png"))
        finally:
            os.kill(hung, signal.SIGCONT)
        # Back: it answers again and is shown up.
        wait_until(
            lambda: rows(browser)["shard-1/leader"]["state"] == "up",
            SHOWN_WITHIN,
            message="the resumed leader is shown up again",
        )
        # The serving node itself gone: the page says so and keeps its last view.
        os.kill(pids["shard-0/leader"], signal.SIGKILL)
        problem = browser.find_element("id", "problem")
        wait_until(problem.is_displayed, SHOWN_WITHIN, message="the page reports its node gone")
        assert problem.text.startswith(f"cannot reach {page}"), problem.text
        assert rows(browser)["shard-0/leader"]["state"] == "up"  # the last view, kept
    assert (tmp_path / "ui.png").stat().st_size > 10_000
