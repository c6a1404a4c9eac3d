"""What a gateway installs: the wheel and the Debian package, built from this tree.

Their contents are checked (the gateway's dependencies only, no lab; the unit, sample config
and guard; man pages that cover every command, option and key; conffiles; lintian without
errors), and both run the gateway without the lab: the wheel in a fresh venv with PyPI's
libraries, the .deb's files with Debian 12's python3 and python3-* libraries. Each runs
``vpnmasq --version``, ``check-config`` and, in the namespace lab, ``run`` masquerading ESP
from two LAN hosts to one remote.
"""

from __future__ import annotations

import email
import gzip
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import (
    H1,
    H2,
    METRICS_PORT,
    PUBLIC,
    Daemon,
    Remote,
    esp_exchange,
    metrics_text,
)

from vpnmasq import config as cfgmod
from vpnmasq.cli import cli
from vpnmasq_lab.topology import Topology

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
GATEWAY_DEPS = {"click", "rich", "pyroute2", "prometheus-client"}
CONFFILES = {"/etc/vpnmasq/vpnmasq.toml", "/etc/vpnmasq/guard.nft"}
SHARED = {"vpnmasq.service", "vpnmasq.toml", "guard.nft"}
DEBIAN_PYTHON = "/usr/bin/python3"
CONFIG = 'outside_interface = "wan0"\ninside_networks = ["10.77.0.0/24"]\n'


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)  # type: ignore[call-overload,no-any-return]


@dataclass(frozen=True)
class Install:
    """A vpnmasq command as an admin would have it, and the environment it needs."""

    name: str
    command: list[str]
    env: dict[str, str] | None = None

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run([*self.command, *args], env=self.env)


# ------------------------------------------------------------------------------ builds
@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("packages")


@pytest.fixture(scope="module")
def wheel(build_dir: Path) -> Path:
    r = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(build_dir),
             str(ROOT)])
    assert r.returncode == 0, r.stderr
    return build_dir / f"vpnmasq-{VERSION}-py3-none-any.whl"


@pytest.fixture(scope="module")
def deb(build_dir: Path) -> Path:
    if shutil.which("dpkg-buildpackage") is None:
        pytest.skip("dpkg-buildpackage missing: run scripts/setup.sh")
    r = run([str(ROOT / "scripts" / "build-deb.sh"), str(build_dir)])
    assert r.returncode == 0, r.stdout + r.stderr
    path = build_dir / f"vpnmasq_{VERSION}_all.deb"
    assert r.stdout.strip() == str(path)
    return path


@pytest.fixture(scope="module")
def wheel_install(wheel: Path, build_dir: Path) -> Install:
    """A fresh venv with the wheel and its dependencies from the index, nothing else."""
    venv = build_dir / "venv"
    assert run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    r = run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)])
    assert r.returncode == 0, r.stderr
    return Install("wheel", [str(venv / "bin" / "vpnmasq")])


@pytest.fixture(scope="module")
def deb_root(deb: Path, build_dir: Path) -> Path:
    root = build_dir / "deb-root"
    assert run(["dpkg-deb", "-x", str(deb), str(root)]).returncode == 0
    return root


@pytest.fixture(scope="module")
def deb_install(deb_root: Path) -> Install:
    """The package's files run by Debian's python3 with Debian's python3-* libraries."""
    env = {**os.environ, "PYTHONPATH": str(deb_root / "usr/lib/python3/dist-packages")}
    env.pop("VIRTUAL_ENV", None)
    r = run([DEBIAN_PYTHON, "-c", "import click, rich, pyroute2, prometheus_client as p; "
             "print(click.__file__, pyroute2.__file__, p.__file__)"], env=env)
    assert r.returncode == 0, f"{r.stderr}\nDebian's python3-* libraries: run scripts/setup.sh"
    assert all(f.startswith("/usr/lib/python3/dist-packages/") for f in r.stdout.split())
    return Install("deb", [DEBIAN_PYTHON, str(deb_root / "usr/bin/vpnmasq")], env)


# ------------------------------------------------------------------------------ the wheel
def test_the_wheel_holds_the_gateway_its_service_files_and_license_only(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = email.message_from_bytes(z.read(f"vpnmasq-{VERSION}.dist-info/METADATA"))
    tops = {n.split("/")[0] for n in names}
    assert tops == {"vpnmasq", f"vpnmasq-{VERSION}.dist-info", f"vpnmasq-{VERSION}.data"}, tops
    assert {"vpnmasq/cli.py", "vpnmasq/daemon.py", "vpnmasq/datapath/nfqueue.py"} <= names
    assert {n.rsplit("/", 1)[1] for n in names if "/data/share/vpnmasq/" in n} == SHARED
    assert f"vpnmasq-{VERSION}.dist-info/licenses/LICENSE" in names
    assert meta["License-Expression"] == "GPL-2.0-or-later"
    requires = meta.get_all("Requires-Dist") or []
    plain = {re.split(r"[ <>=;\[]", r, maxsplit=1)[0] for r in requires if "extra ==" not in r}
    assert plain == GATEWAY_DEPS
    pcap = [r for r in requires if "extra == 'pcap'" in r]
    assert [r.split(";")[0] for r in pcap] == ["scapy>=2.5"]


def test_the_wheel_installs_and_checks_a_config_without_the_lab(
    wheel_install: Install, tmp_path: Path
) -> None:
    assert wheel_install("--version").stdout == f"vpnmasq, version {VERSION}\n"
    cfg = tmp_path / "vpnmasq.toml"
    cfg.write_text(CONFIG)
    r = wheel_install("check-config", "--offline", str(cfg))
    assert (r.returncode, r.stdout) == (0, f"OK: {cfg}\n"), r.stderr
    py = str(Path(wheel_install.command[0]).with_name("python"))
    for absent in ("vpnmasq_lab", "scapy", "cryptography"):
        assert run([py, "-c", f"import {absent}"]).returncode == 1, f"{absent} is installed"
    r = wheel_install("demo")
    assert r.returncode == 1 and "vpnmasq-lab" in r.stderr, r.stderr
    r = wheel_install("trace", "--read", str(cfg))
    assert r.returncode == 1 and "pip install 'vpnmasq[pcap]'" in r.stderr, r.stderr
    share = Path(py).parents[1] / "share" / "vpnmasq"
    assert {p.name for p in share.iterdir()} == SHARED


# ------------------------------------------------------------------------------ the .deb
def _deb_field(deb: Path, field: str) -> str:
    return run(["dpkg-deb", "-f", str(deb), field]).stdout.strip()


def test_the_deb_contents(deb: Path, deb_root: Path) -> None:
    listing = run(["dpkg-deb", "-c", str(deb)]).stdout
    paths = {line.split()[-1].removeprefix(".") for line in listing.splitlines()}
    for p in (
        "/usr/bin/vpnmasq",
        "/usr/lib/python3/dist-packages/vpnmasq/daemon.py",
        "/lib/systemd/system/vpnmasq.service",
        *CONFFILES,
        "/usr/share/man/man8/vpnmasq.8.gz",
        "/usr/share/man/man5/vpnmasq.toml.5.gz",
        "/usr/share/bash-completion/completions/vpnmasq",
        "/usr/share/doc/vpnmasq/copyright",
    ):
        assert p in paths, p
    assert not any("vpnmasq_lab" in p or "/share/vpnmasq/" in p for p in paths)
    # the rest of packaging/ (HA, monitoring) ships as examples
    others = {p.name for p in (ROOT / "packaging").rglob("*") if p.is_file()} - SHARED
    assert others <= {Path(p).name for p in paths if "/usr/share/doc/vpnmasq/examples/" in p}
    conffiles = run(["dpkg-deb", "-I", str(deb), "conffiles"]).stdout.split()
    assert set(conffiles) == CONFFILES
    assert _deb_field(deb, "Version") == VERSION and _deb_field(deb, "Architecture") == "all"
    depends = {d.strip().split(" ")[0] for d in _deb_field(deb, "Depends").split(",")}
    assert {"python3-click", "python3-rich", "python3-pyroute2", "python3-prometheus-client",
            "nftables", "iptables", "iproute2"} <= depends
    assert not {"python3-scapy", "python3-cryptography"} & depends
    assert _deb_field(deb, "Suggests") == "python3-scapy"
    # the unit starts the vpnmasq this package installs (and other programs that exist)
    unit = (deb_root / "lib/systemd/system/vpnmasq.service").read_text()
    programs = re.findall(r"^Exec\w+=[-+!@:|]*(\S+)", unit, re.M)
    assert "/usr/bin/vpnmasq" in programs, programs
    for prog in programs:
        assert prog in paths if Path(prog).name == "vpnmasq" else os.path.exists(prog), prog
    assert (deb_root / "etc/vpnmasq/vpnmasq.toml").read_text() == (
        ROOT / "packaging/vpnmasq.toml"
    ).read_text()


def test_lintian_finds_no_errors(deb: Path) -> None:
    if shutil.which("lintian") is None:
        pytest.skip("lintian missing: run scripts/setup.sh")
    r = run(["lintian", "--fail-on", "error", str(deb)])
    errors = [line for line in r.stdout.splitlines() if line.startswith("E:")]
    assert r.returncode == 0 and errors == [], r.stdout + r.stderr


def _man(deb_root: Path, page: str) -> str:
    """The page's roff source as text: fonts and escapes removed."""
    path = next(deb_root.glob(f"usr/share/man/man*/{page}.gz"))
    roff = gzip.decompress(path.read_bytes()).decode()
    return re.sub(r"\\f[BIR]|\\&", "", roff).replace("\\-", "-").replace("\\e", "\\")


def test_man_pages_cover_every_command_option_and_key(deb_root: Path) -> None:
    page8 = _man(deb_root, "vpnmasq.8")
    for name, cmd in cli.commands.items():  # type: ignore[attr-defined]
        assert f'.SS "vpnmasq {name} ' in page8, name
        for param in cmd.params:
            for o in getattr(param, "opts", []):
                if o.startswith("-"):
                    assert re.search(rf"^{re.escape(o)}\b|, {re.escape(o)}\b", page8, re.M), (
                        f"{name} {o}"
                    )
    page5 = _man(deb_root, "vpnmasq.toml.5")
    keys = [s.key for s in cfgmod.TOP_KEYS]
    keys += [f"timeouts.{s.key}" for s in cfgmod.TIMEOUT_KEYS]
    keys += [f"limits.{s.key}" for s in cfgmod.LIMIT_KEYS]
    for key in keys:
        assert re.search(rf"^\.TP\n{re.escape(key)} \(", page5, re.M), key


def test_the_deb_runs_on_debians_own_libraries(deb_install: Install, deb_root: Path) -> None:
    assert deb_install("--version").stdout == f"vpnmasq, version {VERSION}\n"
    sample = deb_root / "etc/vpnmasq/vpnmasq.toml"
    r = deb_install("check-config", "--offline", str(sample))
    assert (r.returncode, r.stdout) == (0, f"OK: {sample}\n"), r.stderr
    completion = (deb_root / "usr/share/bash-completion/completions/vpnmasq").read_text()
    assert "_VPNMASQ_COMPLETE=bash_complete" in completion
    env = {**(deb_install.env or {}), "_VPNMASQ_COMPLETE": "bash_complete",
           "COMP_WORDS": "vpnmasq check-c", "COMP_CWORD": "1"}
    r = run(deb_install.command, env=env)
    assert r.stdout.strip() == "plain,check-config", r.stdout + r.stderr


# ------------------------------------------------------------------------------ running it
@pytest.fixture(params=["wheel", "deb"])
def install(request: pytest.FixtureRequest) -> Iterator[Install]:
    yield request.getfixturevalue(f"{request.param}_install")


@pytest.mark.netns
def test_the_installed_gateway_masquerades_esp_from_two_hosts(
    install: Install, topo: Topology, remote: Remote, workdir: Path
) -> None:
    """Also status (rich) and the metrics endpoint (prometheus-client), in each install's
    versions of those libraries."""
    d = Daemon(topo, "hybrid", workdir, command=install.command, env=install.env)
    d.write_config(f'metrics_listen = "127.0.0.1:{METRICS_PORT}"\n')
    d.start()
    try:
        assert esp_exchange(topo, "h1", 0x1001), d.log()
        assert esp_exchange(topo, "h2", 0x1002), d.log()
        assert {(PUBLIC, 0x1001), (PUBLIC, 0x1002)} <= set(remote.saw("esp")), remote.saw("esp")
        status = install("status", "--socket", d.socket_path, "--proto", "esp")
        assert status.returncode == 0, status.stderr
        assert H1 in status.stdout and H2 in status.stdout, status.stdout
        assert re.search(r"^vpnmasq_build_info\{", metrics_text(topo, METRICS_PORT), re.M)
    finally:
        assert d.stop() == 0, d.log()
