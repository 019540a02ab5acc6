"""The dependency rules the tree is drawn by (README "Code map"), checked on the source: the
router never imports torch or the shard, and the shard imports nothing of the router (what both
need, torch-free, lives in protos/)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported(package: str) -> dict[str, set[str]]:
    """Top-level names each module of `package` imports, at any depth of its code."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_imports_are_read_from_every_module() -> None:
    modules = imported("shard")
    assert len(modules) > 40, "the walk found too few shard modules"
    assert "torch" in modules["shard/engine/engine.py"]
    assert "protos" in modules["shard/edge/server.py"]


def test_router_imports_neither_torch_nor_the_shard() -> None:
    bad = {
        m: n & {"torch", "shard"} for m, n in imported("router").items() if n & {"torch", "shard"}
    }
    assert not bad


def test_shard_imports_nothing_of_the_router() -> None:
    bad = [m for m, names in imported("shard").items() if "router" in names]
    assert not bad, f"import what router and shard share from protos/ instead: {bad}"


def test_protos_import_neither_the_router_nor_the_shard_nor_torch() -> None:
    bad = {m: n & {"torch", "shard", "router"} for m, n in imported("protos").items()}
    assert not any(bad.values()), bad


def test_readme_code_map_names_every_package() -> None:
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- section: code-map -->", "<!-- /section: code-map -->"
    assert start in readme and end in readme, "README lost its code map"
    code_map = readme[readme.index(start) : readme.index(end)]
    packages = {
        str(init.parent.relative_to(ROOT)) + "/"
        for top in ("router", "shard")
        for init in (ROOT / top).rglob("__init__.py")
    }
    packages |= {"protos/", "csrc/", "k8s/", "benchmarks/", "tests/"}
    assert "shard/engine/" in packages
    missing = sorted(p for p in packages if f"`{p}`" not in code_map)
    assert not missing, f"README's code map does not name {missing}"


def test_no_source_module_is_over_400_lines() -> None:
    """Split by concept past ~400 lines (generated protobuf stubs aside)."""
    sources = [
        path
        for top in ("protos", "router", "shard")
        for path in (ROOT / top).rglob("*.py")
        if "_pb2" not in path.name
    ]
    assert len(sources) > 60, "the walk found too few modules"
    long = {
        str(p.relative_to(ROOT)): n for p in sources if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, f"split these by concept: {long}"


# The shard's parts, highest first (each package's __init__ docstring): a module imports only
# from its own part and the parts below it. `shard.config` and `shard.metrics` are the process's
# one config and counters, built at the top and passed down, so any part may name their types.
PARTS = (
    ("entry", ("shard.__main__", "shard.compose")),
    ("edge", ("shard.edge",)),
    (
        "ranks",
        tuple(
            f"shard.parallel.{m}"
            for m in ("channel", "follower", "leader", "messages", "rank", "shutdown", "spawn")
        ),
    ),
    ("engine", ("shard.engine",)),
    ("adapters", ("shard.adapters",)),
    ("model", ("shard.model",)),
    ("kernels and collectives", ("shard.ops", "shard.parallel.group")),
)
# Known imports against the parts, each to be removed rather than added to.
AGAINST = {("shard.adapters.loader", "shard.engine.faults")}  # `quote` for error messages


def part_of(module: str) -> int | None:
    """Index in PARTS of the longest prefix that names `module`, or None (config, metrics...)."""
    found = [
        (len(prefix), i)
        for i, (_, prefixes) in enumerate(PARTS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    return max(found)[1] if found else None


def shard_imports() -> Iterator[tuple[str, str, str]]:
    """(module, source, name) of every import in shard/: `from shard.model import fusion` in
    shard.compose gives ("shard.compose", "shard.model", "shard.model.fusion"), since it
    imports a module and is judged by its full name."""
    for path in sorted((ROOT / "shard").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for a in node.names:
                    yield module, node.module, f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    yield module, a.name, a.name


def test_shard_imports_point_down_its_parts() -> None:
    upward = set()
    for module, source, name in shard_imports():
        mine, theirs = part_of(module), part_of(name)
        if mine is not None and theirs is not None and theirs < mine:
            upward.add((module, source))
    # Equal, not a subset: an exception that is gone must leave AGAINST too.
    assert upward == AGAINST, f"imports against the parts: {sorted(upward ^ AGAINST)}"


def test_the_engine_and_the_parts_below_it_take_values_not_the_shard_config() -> None:
    """One frozen config per process, read at the top: the composition root gives the engine and
    the parts below it the values each needs, so none of them imports `shard.config`."""
    engine = [name for name, _ in PARTS].index("engine")
    below = {module for module, _, _ in shard_imports() if (part_of(module) or -1) >= engine}
    assert "shard.engine.memory_plan" in below  # the walk reaches the engine
    readers = {
        module
        for module, source, name in shard_imports()
        if module in below and "shard.config" in (source, name)
    }
    assert not readers, f"pass these the values they need instead of ShardConfig: {readers}"
