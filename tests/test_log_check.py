"""daemonlog.daemon_log_check, on log files written here: what it lets
through and what fails a test (the real daemons' logs go through it in every
mount test)."""

from __future__ import annotations

from daemonlog import daemon_problems


def test_unexpected_warnings_and_exit_statuses_are_problems(tmp_path) -> None:
    log = tmp_path / "daemon.txt"  # not *.log: the fixture would check it as a real log
    log.write_text(
        "2026-11-26 02:14:27,604 17652 memfs.daemon INFO: mounted /m\n"
        "2026-11-26 02:14:27,605 17652 memfs.fetcher ERROR: CHECKSUM MISMATCH in region ram0\n"
        "Traceback (most recent call last):\n"
        "2026-11-26 02:14:27,606 17652 memfs.fs WARNING: refused open(O_TRUNC) of region ram0\n"
        "2026-11-26 02:14:27,607 17652 memfs.pages CRITICAL: boom\n")
    exits = [(["memfs", "mount"], 0), (["memfs", "mount"], -9), (["memfs", "mount"], None)]
    got = daemon_problems([str(log)], exits, [r"refused open\(O_TRUNC\)"], {0})
    assert got == [
        f"{log}: 2026-11-26 02:14:27,605 17652 memfs.fetcher ERROR: CHECKSUM MISMATCH in "
        "region ram0",
        f"{log}: 2026-11-26 02:14:27,607 17652 memfs.pages CRITICAL: boom",
        "daemon ['memfs', 'mount'] exited -9"]
    assert daemon_problems([str(log)], exits, ["CHECKSUM", "refused", "boom"], {0, -9}) == []
    assert daemon_problems([str(tmp_path / "missing.log")], [], [], {0}) == []
