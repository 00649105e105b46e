"""A test fails when its memfs daemon logged a WARNING or worse that the
test did not declare, or exited non-zero, as S3QL's test suite does: a
warning nobody expected is a bug, or a test that does not say what it does.

Declare with ``@pytest.mark.expect_log(regex, ...)`` (searched in the
message of each loud line), the ``expect_log`` fixture (``expect_log(regex)``
at run time) and ``@pytest.mark.expect_exit(code, ...)``.  Daemons checked:
those started with ramimage.mounted (log and exit status), and every memfs
log file (``*.log``) left in the test's tmp_path.  conftest.py imports the
fixtures and hooks from here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import ramimage


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "expect_log(*regexes): WARNING-or-worse daemon log "
                            "lines this test expects (see daemon_log_check)")
    config.addinivalue_line("markers", "expect_exit(*codes): exit statuses this test "
                            "expects of the daemons it starts with ramimage.mounted")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    if call.when == "call":
        item.stash[_CALL_FAILED] = outcome.get_result().failed  # type: ignore[attr-defined]


_CALL_FAILED = pytest.StashKey[bool]()
#: known bugs, reported and not fixed yet: tolerated in every test, so that
#: the suite does not fail at random where they strike
_KNOWN: list[str] = []
#: a memfs log line (memfs.logs.setup_logging) at WARNING or worse
_LOUD = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ (\d+) (memfs[\w.]*) (WARNING|ERROR|CRITICAL): "
                   r"(.*)$")


@pytest.fixture
def expect_log(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``expect_log(regex)``: a daemon log line at WARNING or worse that this
    test expects (searched in the message); for patterns known only at run time."""
    wanted: list[str] = request.node.stash.setdefault(_EXPECTED, [])
    return wanted.append


_EXPECTED = pytest.StashKey[list]()


def _loud_lines(path: str) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip("\n") for line in f if _LOUD.match(line)]
    except OSError:
        return []


def daemon_problems(logs: list[str], exits: list[tuple[object, int | None]],
                    wanted: list[str], codes: set[int]) -> list[str]:
    """Log lines at WARNING or worse that no ``wanted`` regex finds in their
    message, and exit statuses not in ``codes`` (None: still running)."""
    out = [f"{path}: {line}" for path in logs for line in _loud_lines(path)
           if not any(re.search(w, _LOUD.match(line).group(4)) for w in wanted)]  # type: ignore
    out += [f"daemon {args} exited {code}" for args, code in exits
            if code is not None and code not in codes]
    return out


@pytest.fixture(autouse=True)
def daemon_log_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test whose memfs daemon logged a WARNING or worse the test did
    not declare (``@pytest.mark.expect_log(regex, ...)`` or the ``expect_log``
    fixture), or whose daemon exited non-zero (``@pytest.mark.expect_exit``),
    as S3QL's test suite does: a warning nobody expected is a bug or a test
    that does not say what it does.  Daemons: those started with
    ramimage.mounted, and every memfs log file left in the test's tmp_path."""
    first = len(ramimage.DAEMONS)
    yield
    daemons = ramimage.DAEMONS[first:]
    del ramimage.DAEMONS[first:]
    if request.node.stash.get(_CALL_FAILED, True):
        return  # failed already (or never ran): that report says more
    wanted = _KNOWN + [p for m in request.node.iter_markers("expect_log") for p in m.args]
    wanted += request.node.stash.get(_EXPECTED, [])
    codes = {c for m in request.node.iter_markers("expect_exit") for c in m.args} | {0}
    logs = {log for log, _ in daemons}
    tmp = request.node.funcargs.get("tmp_path")
    if isinstance(tmp, Path):
        logs.update(str(p) for p in tmp.rglob("*.log") if p.is_file())
    problems = daemon_problems(sorted(logs), [(p.args, p.returncode) for _, p in daemons],
                               wanted, codes)
    problems += [f"its stderr ({log}.stderr): {ramimage.file_tail(log + '.stderr', 1500)}"
                 for log, p in daemons if p.returncode not in codes | {None}]
    if problems:
        pytest.fail("unexpected daemon log lines or exit status (declare them with "
                    "@pytest.mark.expect_log / expect_exit if the test means them):\n"
                    + "\n".join(problems[:40]), pytrace=False)
