"""The size rules of issue 13 for tools/ as test_layers states them for memfs/:
a file of at most ~400 lines, a function of at most ~60 lines.

The benchmark scripts are Python without a .py ending, so a file in tools/
counts as Python by its shebang (or its .py ending); tools/benchlib/ is the
package of their shared code.  Functions are found with ``ast``, nested ones
and methods too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from test_layers import MAX_FUNCTION_LINES, MAX_MODULE_LINES

TOOLS = Path(__file__).resolve().parents[1] / "tools"

#: files over MAX_MODULE_LINES and (file, function) over MAX_FUNCTION_LINES,
#: each with why; none today (declarative tables could stand here)
FILES_OVER: dict[str, str] = {}
FUNCTIONS_OVER: dict[tuple[str, str], str] = {}


def is_python(path: Path) -> bool:
    """A .py file, or a script whose first line names python."""
    if path.suffix == ".py":
        return True
    with path.open("rb") as f:
        first = f.readline()
    return first.startswith(b"#!") and b"python" in first


def python_files() -> list[Path]:
    """Every Python script in tools/ and every module of tools/benchlib/."""
    scripts = [p for p in sorted(TOOLS.iterdir()) if p.is_file() and is_python(p)]
    return scripts + sorted((TOOLS / "benchlib").glob("*.py"))


def rel(path: Path) -> str:
    return str(path.relative_to(TOOLS.parent))


def long_functions(source: str, limit: int) -> dict[str, int]:
    """{"LINE NAME": lines} of every function or method over ``limit`` lines."""
    return {f"{node.lineno} {node.name}": n
            for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and (n := node.end_lineno - node.lineno + 1) > limit}  # type: ignore[operator]


def test_the_scripts_are_found() -> None:
    """Scripts are told by their shebang: every bench script is read, the
    shell scripts are not (else the rules below could pass on nothing)."""
    found = {rel(p) for p in python_files()}
    assert {"tools/bench", "tools/bench-pagemap", "tools/bench-migrate",
            "tools/benchlib/__init__.py", "tools/benchlib/stats.py"} <= found
    assert not {"tools/setup", "tools/test", "tools/mkguest"} & found


def test_no_tool_file_over_400_lines() -> None:
    over = {rel(p): n for p in python_files()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    unexplained = {f: n for f, n in over.items() if f not in FILES_OVER}
    assert not unexplained, f"tools files over {MAX_MODULE_LINES} lines: {unexplained}"


def test_no_tool_function_over_60_lines() -> None:
    over = {}
    for p in python_files():
        for where, n in long_functions(p.read_text(), MAX_FUNCTION_LINES).items():
            if (rel(p), where.split()[1]) not in FUNCTIONS_OVER:
                over[f"{rel(p)}:{where}"] = n
    assert not over, f"tools functions over {MAX_FUNCTION_LINES} lines: {over}"


def test_the_exceptions_name_real_places() -> None:
    """An exception for a file or function that no longer exists is stale."""
    for f in FILES_OVER:
        assert (TOOLS.parent / f).is_file(), f
    for f, name in FUNCTIONS_OVER:
        tree = ast.parse((TOOLS.parent / f).read_text())
        assert any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name
                   for n in ast.walk(tree)), (f, name)


def test_long_functions_counts_methods_and_nested_functions() -> None:
    """The rule itself: a method and a nested function are measured too, from
    their def to their last line."""
    body = "\n".join(f"        x{i} = {i}" for i in range(4))
    source = (f"class C:\n    def m(self):\n{body}\n"
              f"def outer():\n    async def inner():\n{body}\n    return inner\n")
    assert long_functions(source, 4) == {"2 m": 5, "7 outer": 7, "8 inner": 5}
    assert long_functions(source, 7) == {}
