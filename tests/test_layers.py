"""The layers of DESIGN.md, read from the imports of every module under memfs/.

Each rule below is a row of DESIGN.md's table of layers, written as data:
which modules it holds, and what of memfs they may (or must never) import.
Imports are read with ``ast`` (inside functions too: a late import is still a
dependency), resolved to module names, and followed transitively where a rule
says "never reaches": the serving side must not get capture by way of a
helper that imports it.

The size rules (issue 13): a module of at most ~400 lines holds one idea, a
function of at most ~60 lines can be read at once. The exceptions are named,
each with its reason.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "memfs"

#: the serving side: what runs in a mount's daemon (and its supervisor)
SERVING = ("memfs.fs", "memfs.pages", "memfs.prefetch", "memfs.fetcher", "memfs.store",
           "memfs.daemon", "memfs.dirty", "memfs.stats", "memfs.state", "memfs.source",
           "memfs.sync", "memfs.takeover", "memfs.supervisor",
           # split out of the above in issue 13
           "memfs.supervised", "memfs.journal", "memfs.mountopts", "memfs.mounttable",
           "memfs.fetch_plan", "memfs.fetch_flight", "memfs.fetch_slots", "memfs.served",
           "memfs.held")


@dataclass(frozen=True)
class Layer:
    """One row of DESIGN.md's table of layers."""
    name: str
    modules: tuple[str, ...]      #: module names, or packages ("memfs.disks.*")
    may_import: tuple[str, ...] | None = None  #: memfs modules it may import directly
    never_reaches: tuple[str, ...] = ()         #: not even through others' imports
    why: str = ""


LAYERS = (
    Layer("page map", ("memfs.pagemap.*",),
          may_import=("memfs.pagemap.*", "memfs.fileio", "memfs.msgfile"),
          why="pure data: states, locations, checksums; load, save, validate"),
    Layer("disks", ("memfs.disks.*",),
          may_import=("memfs.disks.*", "memfs.fileio", "memfs._fast"),  # _fast: native I/O
          why="byte ranges of a disk named by URI; they know nothing of pages or FUSE"),
    Layer("disk index file", ("memfs.index.format",),
          may_import=("memfs.msgfile", "memfs.pagemap", "memfs.fileio"),
          why="pure data like the page map: load, save, validate, look up"),
    Layer("disk index", ("memfs.index.*",),
          never_reaches=("memfs.capture", "memfs.qemu.*", "memfs.cli.*"),
          why="capture asks the index, the index does not know capture"),
    Layer("serving side", SERVING,
          never_reaches=("memfs.capture", "memfs.capture_inputs", "memfs.capture_read",
                         "memfs.index.build", "memfs.index.referencer", "memfs.qemu.*",
                         "memfs.cli.*"),
          why="a mount serves pages; capturing, indexing and QEMU are other processes"),
)

#: names a command module offers the CLI; only memfs.cli imports them
ENTRY_POINTS = ("add_parser", "main")
ENTRY_PREFIX = "cmd_"

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60

#: modules still over MAX_MODULE_LINES, each with why; remove an entry once
#: its module is within the limit (a shorter module never fails the test)
MODULES_OVER: dict[str, str] = {}

#: functions over MAX_FUNCTION_LINES: (file, function) -> why.  Declarative
#: tables (an argparse parser, a dispatch table) may stand here for good; none
#: needs to today: the rest are code still to be split
FUNCTIONS_OVER: dict[tuple[str, str], str] = {}


# -- reading the imports -------------------------------------------------------------

def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


MODULES = all_modules()


def _resolve(mod: str, name: str | None = None) -> str:
    """``from mod import name``: the submodule if name is one, else mod."""
    if name and f"{mod}.{name}" in MODULES:
        return f"{mod}.{name}"
    return mod


def imports_of(mod: str) -> dict[str, set[str]]:
    """{memfs module imported: names taken from it}, from every import
    statement in the module, at any depth."""
    path = MODULES[mod]
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "memfs":
                    found.setdefault(alias.name, set())
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            if src.split(".")[0] != "memfs":
                continue
            for alias in node.names:
                found.setdefault(_resolve(src, alias.name), set()).add(alias.name)
    return found


def with_parents(mod: str) -> list[str]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ first."""
    parts = mod.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)
            if ".".join(parts[:i]) in MODULES]


def reached_from(mod: str) -> dict[str, list[str]]:
    """Every memfs module importing MOD runs, with one import chain to it."""
    paths: dict[str, list[str]] = {mod: [mod]}
    todo = [mod]
    while todo:
        cur = todo.pop()
        for imported in imports_of(cur):
            for m in with_parents(imported):
                if m not in paths:
                    paths[m] = paths[cur] + [m]
                    todo.append(m)
    return paths


def matches(mod: str, patterns: tuple[str, ...]) -> bool:
    """"memfs.x.*" is the package memfs.x and everything in it."""
    for pat in patterns:
        if pat.endswith(".*"):
            if mod == pat[:-2] or mod.startswith(pat[:-1]):
                return True
        elif mod == pat:
            return True
    return False


def members(layer: Layer) -> list[str]:
    found = [m for m in MODULES if matches(m, layer.modules)]
    assert found, f"layer {layer.name}: no module matches {layer.modules}"
    return found


# -- the rules -------------------------------------------------------------------------

@pytest.mark.parametrize("layer", [la for la in LAYERS if la.may_import is not None],
                         ids=lambda la: la.name)
def test_layer_imports_only_below(layer: Layer) -> None:
    assert layer.may_import is not None
    bad = [f"{m} imports {imp}" for m in members(layer) for imp in imports_of(m)
           if imp != "memfs" and not matches(imp, layer.may_import)]  # memfs: the version
    assert not bad, f"{layer.name} ({layer.why}) may import only {layer.may_import}: {bad}"


@pytest.mark.parametrize("layer", [la for la in LAYERS if la.never_reaches],
                         ids=lambda la: la.name)
def test_layer_never_reaches(layer: Layer) -> None:
    bad = []
    for m in members(layer):
        for reached, chain in sorted(reached_from(m).items()):
            if matches(reached, layer.never_reaches):
                bad.append(" -> ".join(chain))
    assert not bad, f"{layer.name} ({layer.why}) must never import " \
                    f"{layer.never_reaches}: {bad}"


def test_only_the_cli_knows_every_command() -> None:
    """Command entry points (cmd_*, add_parser, main) are imported by memfs.cli
    alone, and no module outside memfs.cli imports the CLI."""
    bad = []
    for m in MODULES:
        if matches(m, ("memfs.cli.*", "memfs.__main__")):  # __main__: python -m memfs
            continue
        for imported, names in imports_of(m).items():
            if matches(imported, ("memfs.cli.*",)):
                bad.append(f"{m} imports the CLI ({imported})")
            entry = sorted(n for n in names if n in ENTRY_POINTS or n.startswith(ENTRY_PREFIX))
            if entry:
                bad.append(f"{m} imports {entry} from {imported}")
    assert not bad


def test_the_cli_registers_every_command_statically() -> None:
    """memfs.cli lists every sub-command as a module it imports, and registers
    nothing at run time."""
    source = MODULES["memfs.cli"].read_text()
    for word in ("__import__", "importlib", "_EXTRA_COMMANDS", "_load_extras"):
        assert word not in source
    from memfs.cli import COMMANDS, build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(["capture", "mount", "load", "save", "umount",
                                          "stats", "index", "migrate", "snapshot",
                                          "restore"])
    assert all(hasattr(c, "add_parser") for c in COMMANDS)


# -- sizes ---------------------------------------------------------------------------------

def _rel(path: Path) -> str:
    return str(path.relative_to(PKG.parent))


def test_no_module_over_400_lines() -> None:
    over = {_rel(p): n for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    unexplained = {f: n for f, n in over.items() if f not in MODULES_OVER}
    assert not unexplained, f"modules over {MAX_MODULE_LINES} lines: {unexplained}"


def test_no_function_over_60_lines() -> None:
    over = {}
    for p in MODULES.values():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > MAX_FUNCTION_LINES and (_rel(p), node.name) not in FUNCTIONS_OVER:
                    over[f"{_rel(p)}:{node.lineno} {node.name}"] = n
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines: {over}"


def test_the_exceptions_name_real_places() -> None:
    """An exception for a file or function that no longer exists is stale."""
    for f in MODULES_OVER:
        assert (PKG.parent / f).is_file(), f
    for f, name in FUNCTIONS_OVER:
        tree = ast.parse((PKG.parent / f).read_text())
        assert any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name
                   for n in ast.walk(tree)), (f, name)


# -- the rules themselves ------------------------------------------------------------------

def test_imports_are_read_at_any_depth() -> None:
    """A late import inside a function counts, and relative imports resolve."""
    imported = imports_of("memfs.cli.capture")
    assert "memfs.index.referencer" in imported
    assert imports_of("memfs.detach").get("memfs.logs") >= {"setup_logging"}
    # the closure follows packages' __init__ and late imports: the CLI reaches capture
    chain = reached_from("memfs.cli")["memfs.capture"]
    assert chain[0] == "memfs.cli" and chain[-1] == "memfs.capture"
    assert matches("memfs.qemu.vm", ("memfs.qemu.*",)) and matches("memfs.qemu", ("memfs.qemu.*",))
    assert not matches("memfs.qemux", ("memfs.qemu.*",))
