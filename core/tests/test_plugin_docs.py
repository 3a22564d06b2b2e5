"""The plugin guide (docs/plugins.md) documents every hook, and its examples work.

Each hook specification of :mod:`distribkv.hookspecs` needs a section headed
``## distribkv_<name>(<args>)`` with the specification's argument names, and exactly one
``python`` example. Each example is run: executed into a fresh module, registered with
``load_plugins(extra=...)`` and used through the plugin manager the way the node uses it.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import types
from collections.abc import Callable, Mapping
from pathlib import Path

import attrs
import falcon.testing
import pluggy
import pytest

from distribkv import PROJECT, hookspecs
from distribkv.config import parse_config
from distribkv.coordination.api import CoordinationError, CoordinationSpec
from distribkv.hashing.api import HashingSpec, Placement, ShardSlot
from distribkv.hashing.shardmap import ShardInfo, ShardMap
from distribkv.http.api import ServerSpec
from distribkv.http.app import create_app
from distribkv.node import Node
from distribkv.plugins import KINDS, PluginRegistry, load_plugins
from distribkv.replication.api import ReplicationRole, TransportSpec
from distribkv.storage.api import BackendSpec, Delete, Namespace, Put
from distribkv.storage.errors import BackendClosedError
from distribkv.storage.store import open_store
from distribkv.testing.cluster import serving

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "plugins.md"

#: The name an example is registered under.
PLUGIN = "doc-example"

# --- reading the guide ---------------------------------------------------------------------

_HOOK_HEADING = re.compile(r"^## (distribkv_\w+)\((.*)\)$")


@attrs.frozen
class Example:
    line: int  # the line of the guide where the code starts
    code: str


@attrs.frozen
class Section:
    hook: str
    args: tuple[str, ...]
    line: int
    examples: tuple[Example, ...]


def python_blocks(text: str) -> list[Example]:
    """Every ```python block of ``text``."""
    blocks: list[Example] = []
    lines = text.splitlines()
    fence: str | None = None
    start = 0
    for number, line in enumerate(lines, 1):
        if fence is None and line.startswith("```"):
            fence, start = line[3:].strip(), number
        elif fence is not None and line.rstrip() == "```":
            if fence == "python":
                blocks.append(Example(start + 1, "\n".join(lines[start : number - 1]) + "\n"))
            fence = None
    return blocks


def parse_sections(text: str) -> tuple[list[Section], list[str]]:
    """The hook sections of the guide, and the headings that look like a hook's but are not
    ``## distribkv_<name>(<args>)``. A section runs to the next ``#`` or ``##`` heading
    outside a code block."""
    sections: list[Section] = []
    malformed: list[str] = []
    lines = text.splitlines()
    current: tuple[str, tuple[str, ...], int] | None = None  # hook, args, heading's line

    def close(end: int) -> None:
        if current is not None:
            hook, args, line = current
            body = "\n".join(lines[line:end])
            examples = tuple(Example(line + e.line, e.code) for e in python_blocks(body))
            sections.append(Section(hook, args, line, examples))

    in_code = False
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code or not line.startswith(("# ", "## ")):
            continue
        close(number - 1)
        current = None
        match = _HOOK_HEADING.match(line.rstrip())
        if match:
            args = tuple(a.strip() for a in match.group(2).split(",") if a.strip())
            current = (match.group(1), args, number)
        elif line.startswith("## distribkv_"):
            malformed.append(line)
    close(len(lines))
    return sections, malformed


def hook_signatures() -> dict[str, tuple[str, ...]]:
    """Every hook specification and its argument names, as pluggy sees them."""
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(hookspecs)
    return {
        name: tuple(caller.spec.argnames)
        for name, caller in vars(manager.hook).items()
        if caller.spec is not None
    }


def problems(text: str, signatures: Mapping[str, tuple[str, ...]]) -> list[str]:
    """What the guide ``text`` lacks or gets wrong about the hooks in ``signatures``."""
    sections, malformed = parse_sections(text)
    found: list[str] = [f"malformed hook heading: {heading!r}" for heading in malformed]
    seen: dict[str, Section] = {}
    for section in sections:
        if section.hook in seen:
            found.append(
                f"{section.hook}: two sections (lines {seen[section.hook].line} and {section.line})"
            )
        seen[section.hook] = section
        expected = signatures.get(section.hook)
        if expected is None:
            found.append(f"{section.hook}: a section for a hook that is not specified")
            continue
        if section.args != expected:
            found.append(
                f"{section.hook}: the heading names ({', '.join(section.args)}), the"
                f" specification ({', '.join(expected)})"
            )
        if len(section.examples) != 1:
            found.append(
                f"{section.hook}: {len(section.examples)} python examples; a section has one"
            )
    for hook, args in sorted(signatures.items()):
        if hook not in seen:
            found.append(f"{hook}: no section '## {hook}({', '.join(args)})'")
    return found


def guide_text() -> str:
    return GUIDE.read_text(encoding="utf-8")


def example_of(hook: str) -> Example:
    sections, _ = parse_sections(guide_text())
    [section] = [s for s in sections if s.hook == hook]
    [example] = section.examples
    return example


# --- running an example --------------------------------------------------------------------


@attrs.frozen
class Loaded:
    hook: str
    example: Example
    module: types.ModuleType
    registry: PluginRegistry


def load_example(hook: str, example: Example, monkeypatch: pytest.MonkeyPatch) -> Loaded:
    """The example executed into a fresh module and registered as plugin ``PLUGIN``."""
    name = f"distribkv_doc_example_{hook}"
    module = types.ModuleType(name)
    module.__file__ = str(GUIDE)
    # Padded so that a traceback names the guide's own line numbers.
    code = compile("\n" * (example.line - 1) + example.code, str(GUIDE), "exec")
    monkeypatch.setitem(sys.modules, name, module)
    exec(code, module.__dict__)
    registry = load_plugins(disabled=(), extra={PLUGIN: module})
    failed = {info.name: info.error for info in registry.failed}
    assert PLUGIN not in failed, f"the example of {hook} is unavailable: {failed[PLUGIN]}"
    implementations = [
        impl
        for impl in getattr(registry.manager.hook, hook).get_hookimpls()
        if impl.plugin_name == PLUGIN
    ]
    assert implementations, f"the example of {hook} does not implement {hook}"
    return Loaded(hook, example, module, registry)


def provided_specs(loaded: Loaded, kind: str) -> list:
    """The specs the example provides of ``kind``, each selectable by its name."""
    specs = [p.spec for p in loaded.registry.provided(kind) if p.plugin.name == PLUGIN]
    assert specs, f"the example of {loaded.hook} provides no {KINDS[kind][1]}"
    for spec in specs:
        assert loaded.registry.select(kind, spec.name) is spec
    return specs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


CLUSTER = """
[cluster]
server = "{server}"
replication = "{replication}"
[storage]
backend = "memory"
data_dir = "{data}"
[[shards]]
name = "s0"
idx = 0
address = "127.0.0.1:{port}"
replicas = ["127.0.0.1:{replica_port}"]
{extra}
"""


def make_node(
    tmp_path: Path,
    registry: PluginRegistry,
    *,
    server: str = "waitress",
    replication: str = "log",
    replica: int | None = None,
    port: int | None = None,
    replica_port: int | None = None,
    cluster: str = "",
    extra: str = "",
) -> Node:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "sharding.toml"
    text = CLUSTER.format(
        server=server,
        replication=replication,
        data=tmp_path / "data",
        port=port or free_port(),
        replica_port=replica_port or free_port(),
        extra=extra,
    )
    text = text.replace("[cluster]\n", f"[cluster]\n{cluster}", 1)
    path.write_text(text)
    return Node(parse_config(text, path), "s0", replica, registry=registry, environ={})


def request(address: str, method: str, target: str, body: bytes | None = None):
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, target, body=body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def logged_by_example(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Messages logged by code of the guide (its examples are compiled as the guide)."""
    return [r.getMessage() for r in caplog.records if r.pathname == str(GUIDE)]


# --- what each hook's example must do ------------------------------------------------------


def check_storage_backends(loaded: Loaded, tmp_path: Path, monkeypatch, caplog) -> None:
    for spec in provided_specs(loaded, "storage"):
        assert isinstance(spec, BackendSpec)
        if spec.check_settings is not None:
            assert set(spec.check_settings({})) >= set(spec.settings_help)
        store = open_store(spec, tmp_path / spec.name)
        store.apply(
            [
                Put(Namespace.DATA, b"a", b"1"),
                Put(Namespace.DATA, b"b", b""),
                Delete(Namespace.DATA, b"a"),
            ],
            sync=True,
        )
        assert store.get_many([b"a", b"b"]) == [None, b""]
        with store.scan() as pairs:
            assert list(pairs) == [(b"b", b"")]
        assert store.stats().backend == spec.name
        store.close()
        store.close()
        with pytest.raises(BackendClosedError):
            store.get(b"b")


PLACEMENT_SCRIPT = """
import json, sys, types
from distribkv.hashing.api import ShardSlot
from distribkv.plugins import load_plugins
module = types.ModuleType("example")
exec(sys.stdin.read(), module.__dict__)
registry = load_plugins(disabled=(), extra={"doc-example": module})
out = {}
for provided in registry.provided("hashing"):
    if provided.plugin.name == "doc-example":
        placement = provided.spec.create([ShardSlot(i, f"shard-{i}") for i in range(5)], {})
        keys = [b"key-%d" % i for i in range(2000)] + [bytes([i]) for i in range(256)]
        out[provided.name] = [placement.shard_for(key) for key in keys]
print(json.dumps(out))
"""


def placements_in_fresh_processes(code: str) -> list[dict]:
    """The example's placements in two processes whose ``hash()`` is salted differently."""
    outputs = []
    for seed in ("1", "2"):
        result = subprocess.run(
            [sys.executable, "-c", PLACEMENT_SCRIPT],
            input=code,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append(json.loads(result.stdout))
    return outputs


def check_hashing_schemes(loaded: Loaded, tmp_path: Path, monkeypatch, caplog) -> None:
    slots = [ShardSlot(i, f"shard-{i}") for i in range(5)]
    keys = [b"key-%d" % i for i in range(2000)] + [bytes([i]) for i in range(256)]
    here = {}
    for spec in provided_specs(loaded, "hashing"):
        assert isinstance(spec, HashingSpec)
        placement = spec.create(slots, {})
        assert isinstance(placement, Placement) and placement.shard_count == 5
        shards = [placement.shard_for(key) for key in keys]
        assert set(shards) == set(range(5)), f"{spec.name} leaves shards empty: {set(shards)}"
        here[spec.name] = shards
        # The map every node and client builds with it (its fingerprint needs describe()).
        infos = [ShardInfo(i, f"shard-{i}", f"127.0.0.1:{9000 + i}") for i in range(5)]
        shard_map = ShardMap(infos, spec)
        assert shard_map.owner_of(b"key-7").idx == placement.shard_for(b"key-7")
    for there in placements_in_fresh_processes(loaded.example.code):
        for name, shards in here.items():
            # Counted, not compared whole: a diff of 2,256 placements takes pytest minutes.
            moved = sum(a != b for a, b in zip(there[name], shards, strict=True))
            assert not moved, f"{name} places {moved} keys differently in another process"


def check_replication_transports(loaded: Loaded, tmp_path: Path, monkeypatch, caplog) -> None:
    registry = loaded.registry
    for spec in provided_specs(loaded, "replication"):
        assert isinstance(spec, TransportSpec)
        port, replica_port = free_port(), free_port()
        leader = make_node(
            tmp_path / spec.name / "leader",
            registry,
            replication=spec.name,
            port=port,
            replica_port=replica_port,
        )
        replica = make_node(
            tmp_path / spec.name / "replica",
            registry,
            replication=spec.name,
            replica=0,
            port=port,
            replica_port=replica_port,
        )
        with serving(leader, registry, monkeypatch):
            assert isinstance(leader.replication, ReplicationRole)
            value = b"\x00\xff value"
            # Written before the replica starts: it arrives by the replica's first resync.
            leader.set(b"resynced", value)
            replica.open()
            try:
                replica.start_replication()
                assert isinstance(replica.replication, ReplicationRole)
                deadline = time.monotonic() + 20
                while replica.get(b"resynced") != value:
                    assert time.monotonic() < deadline, (
                        f"the replica did not resync: {replica.status()['replication']}"
                    )
                    time.sleep(0.02)
                # Written while it follows: these arrive through the transport's pulls.
                leader.delete(b"resynced")
                leader.set(b"pulled", value)
                while replica.get_many([b"resynced", b"pulled"]) != [None, value]:
                    assert time.monotonic() < deadline, (
                        f"the replica did not follow: {replica.status()['replication']}"
                    )
                    time.sleep(0.02)
                assert replica.lag() is not None
            finally:
                replica.stop_replication(timeout=10)
                replica.close()


def check_http_servers(loaded: Loaded, tmp_path: Path, monkeypatch, caplog) -> None:
    registry = loaded.registry
    for spec in provided_specs(loaded, "server"):
        assert isinstance(spec, ServerSpec)
        node = make_node(tmp_path / spec.name, registry, server=spec.name)
        address = str(node.address)
        with serving(node, registry, monkeypatch):
            assert request(address, "PUT", "/set?key=k%FF", b"\x00value")[0] in (200, 204)
            assert request(address, "GET", "/get?key=k%FF") == (200, b"\x00value")
            assert request(address, "GET", "/get?key=absent")[0] == 404
        with pytest.raises(OSError):
            request(address, "GET", "/healthz")  # stopped: nothing listens any more


def check_routes(loaded: Loaded, tmp_path: Path, monkeypatch, caplog) -> None:
    manager = loaded.registry.manager
    others = [plugin for name, plugin in manager.list_name_plugin() if name != PLUGIN]
    node = make_node(tmp_path, loaded.registry).open()
    try:
        # The example's implementation alone, called as the core calls the hook.
        [example_pairs] = manager.subset_hook_caller("distribkv_routes", others)(node=node)
        assert example_pairs, "the example mounts nothing"
        client = falcon.testing.TestClient(create_app(node))
        for path, resource in example_pairs:
            assert isinstance(path, str) and path.startswith("/"), path
            assert resource is not None
            response = client.simulate_get(path)
            assert response.status_code != 404, f"{path} is not mounted"
            assert response.status_code < 500, response.text
    finally:
        node.close()


def check_lifecycle(loaded: Loaded, tmp_path: Path, monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO)
    node = make_node(tmp_path, loaded.registry)
    with serving(node, loaded.registry, monkeypatch):
        pass
    messages = logged_by_example(caplog)
    assert any(node.name in message for message in messages), (
        f"the example of {loaded.hook} logged nothing about {node.name}: {messages}"
    )


def check_coordinations(loaded: Loaded, tmp_path: Path, monkeypatch, caplog) -> None:
    """The example's coordination is selectable, refuses a setting it does not know, and a
    one-shard cluster of a leader and a replica runs under it: the node it names leads (takes
    a write), and the other follows that one."""
    registry = loaded.registry
    for spec in provided_specs(loaded, "coordination"):
        assert isinstance(spec, CoordinationSpec)
        port, replica_port = free_port(), free_port()
        nodes = [
            make_node(
                tmp_path / spec.name / name,
                registry,
                replica=replica,
                port=port,
                replica_port=replica_port,
                cluster=f'coordination = "{spec.name}"\n',
            )
            for name, replica in (("leader", None), ("replica", 0))
        ]
        if spec.check is not None:
            with pytest.raises(CoordinationError):
                spec.check({"no-such-setting": 1}, nodes[0].config)
        with serving(nodes[0], registry, monkeypatch), serving(nodes[1], registry, monkeypatch):
            deadline = time.monotonic() + 20
            while not any(node.is_leader for node in nodes):
                assert time.monotonic() < deadline, "no node took the lead"
                time.sleep(0.02)
            [leader] = [node for node in nodes if node.is_leader]
            [follower] = [node for node in nodes if node is not leader]
            written = request(str(leader.address), "PUT", "/set?key=k%FF", b"\x00v")
            assert written[0] in (200, 204), written
            while follower.get(b"k\xff") != b"\x00v":
                assert time.monotonic() < deadline, (
                    f"{follower.name} did not follow {leader.name}: {follower.status()}"
                )
                time.sleep(0.02)


CHECKS: dict[str, Callable[..., None]] = {
    "distribkv_coordinations": check_coordinations,
    "distribkv_storage_backends": check_storage_backends,
    "distribkv_hashing_schemes": check_hashing_schemes,
    "distribkv_replication_transports": check_replication_transports,
    "distribkv_http_servers": check_http_servers,
    "distribkv_routes": check_routes,
    "distribkv_node_started": check_lifecycle,
    "distribkv_node_stopping": check_lifecycle,
}


# --- the tests -----------------------------------------------------------------------------

SIGNATURES = hook_signatures()


def test_the_guide_has_a_section_with_the_signature_of_every_hook():
    assert problems(guide_text(), SIGNATURES) == []


def test_every_hook_has_a_check_for_its_example():
    assert set(CHECKS) == set(SIGNATURES)


@pytest.mark.parametrize("hook", sorted(SIGNATURES))
def test_the_example_of_each_hook_works_through_the_plugin_manager(
    hook, tmp_path, monkeypatch, caplog
):
    loaded = load_example(hook, example_of(hook), monkeypatch)
    CHECKS[hook](loaded, tmp_path, monkeypatch, caplog)


def test_every_python_block_of_the_guide_compiles():
    blocks = python_blocks(guide_text())
    assert len(blocks) >= len(SIGNATURES)
    for block in blocks:
        compile("\n" * (block.line - 1) + block.code, str(GUIDE), "exec")


# --- the checks above can fail -------------------------------------------------------------


def test_a_guide_without_a_hooks_section_is_refused():
    text = guide_text()
    start = text.index("## distribkv_routes(node)")
    end = text.index("\n## ", start)
    assert problems(text[:start] + text[end + 1 :], SIGNATURES) == [
        "distribkv_routes: no section '## distribkv_routes(node)'"
    ]


@pytest.mark.parametrize(
    ("heading", "problem"),
    [
        ("## distribkv_routes(app)", "the heading names (app), the specification (node)"),
        ("## distribkv_routes()", "the heading names (), the specification (node)"),
        (
            "## distribkv_routes(node: NodeView)",
            "the heading names (node: NodeView), the specification (node)",
        ),
    ],
)
def test_a_heading_with_other_arguments_than_the_specification_is_refused(heading, problem):
    text = guide_text().replace("## distribkv_routes(node)", heading)
    assert problems(text, SIGNATURES) == [f"distribkv_routes: {problem}"]


def test_a_heading_that_is_not_a_signature_is_refused():
    text = guide_text().replace("## distribkv_routes(node)", "## distribkv_routes")
    assert problems(text, SIGNATURES) == [
        "malformed hook heading: '## distribkv_routes'",
        "distribkv_routes: no section '## distribkv_routes(node)'",
    ]


def test_a_section_needs_exactly_one_python_example():
    text = guide_text()
    at = text.index("```python", text.index("## distribkv_hashing_schemes()"))
    without = text[:at] + "```text" + text[at + len("```python") :]
    assert problems(without, SIGNATURES) == [
        "distribkv_hashing_schemes: 0 python examples; a section has one"
    ]
    twice = text[:at] + "```python\npass\n```\n\n" + text[at:]
    assert problems(twice, SIGNATURES) == [
        "distribkv_hashing_schemes: 2 python examples; a section has one"
    ]


def test_a_section_for_a_hook_that_is_not_specified_is_refused():
    text = guide_text() + "\n## distribkv_frobnicate(node)\n\n```python\npass\n```\n"
    assert problems(text, SIGNATURES) == [
        "distribkv_frobnicate: a section for a hook that is not specified"
    ]


def test_a_heading_inside_a_code_block_is_not_a_section():
    text = "# Guide\n\n```python\n## distribkv_routes(node)\n```\n"
    assert "distribkv_routes: no section '## distribkv_routes(node)'" in problems(text, SIGNATURES)


def test_an_example_that_does_not_implement_its_hook_is_refused(monkeypatch):
    with pytest.raises(AssertionError, match="does not implement distribkv_routes"):
        load_example("distribkv_routes", example_of("distribkv_hashing_schemes"), monkeypatch)


SALTED = """
from distribkv import hookimpl
from distribkv.hashing.api import HashingSpec, Placement


class Salted(Placement):
    def __init__(self, shard_count):
        self.shard_count = shard_count

    def shard_for(self, key):
        return hash(key) % self.shard_count


@hookimpl
def distribkv_hashing_schemes():
    return [HashingSpec("salted", lambda shards, settings: Salted(len(shards)), "hash()")]
"""


def test_a_hashing_example_that_uses_pythons_hash_is_refused(tmp_path, monkeypatch, caplog):
    loaded = load_example("distribkv_hashing_schemes", Example(1, SALTED), monkeypatch)
    with pytest.raises(AssertionError, match=r"salted places [0-9]+ keys differently"):
        check_hashing_schemes(loaded, tmp_path, monkeypatch, caplog)


SILENT = """
from distribkv import hookimpl


@hookimpl
def distribkv_node_started(node):
    pass
"""


def test_a_lifecycle_example_that_does_nothing_is_refused(tmp_path, monkeypatch, caplog):
    loaded = load_example("distribkv_node_started", Example(1, SILENT), monkeypatch)
    with pytest.raises(AssertionError, match="logged nothing"):
        check_lifecycle(loaded, tmp_path, monkeypatch, caplog)
