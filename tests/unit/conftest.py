"""Fixtures shared by the unit tests."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vpnmasq import cli as cli_mod
from vpnmasq import daemon


@pytest.fixture
def no_host_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Keep the CLI away from this machine's /etc/vpnmasq and VPNMASQ_* variables: the
    default config path becomes a file in tmp_path (not created), which is returned."""
    for name in list(os.environ):
        if name.startswith("VPNMASQ_"):
            monkeypatch.delenv(name)
    path = tmp_path / "etc-vpnmasq.toml"
    monkeypatch.setattr(cli_mod, "DEFAULT_CONFIG", str(path))
    return path


class Records(logging.Handler):
    """The daemon's log lines as (level, message)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))

    def text(self) -> str:
        return "\n".join(m for _, m in self.lines)


@pytest.fixture
def logs() -> Iterator[Records]:
    """Everything the daemon logs during the test, at every level."""
    h = Records()
    daemon.log.addHandler(h)
    old = daemon.log.level
    daemon.log.setLevel(logging.DEBUG)
    try:
        yield h
    finally:
        daemon.log.removeHandler(h)
        daemon.log.setLevel(old)
