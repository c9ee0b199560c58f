"""Small helpers the command-line tests share: run ``run.py`` quietly, snapshot a folder, the logged
errors, and a guard against a hang."""
from __future__ import annotations

import contextlib
import signal

import run as cli


def run_quiet(*args) -> int:
    """``run.py ARGS --quiet`` in this process; its exit code."""
    return cli.main([*map(str, args), "--quiet"])


def snapshot(folder) -> dict:
    """Every file under ``folder``: its bytes and modification time."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def logged_errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


@contextlib.contextmanager
def no_hang(seconds: int = 20):
    """Fail (instead of waiting forever) when the block does not end in time."""
    def stop(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
