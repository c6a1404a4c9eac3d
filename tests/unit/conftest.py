"""Fixtures shared by the unit tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vpnmasq import cli as cli_mod


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
