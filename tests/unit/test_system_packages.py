"""Every file the project takes from the system belongs to a package that its own set-up installs.

A package installed by hand hides a missing entry in ``scripts/setup.sh`` until the next fresh
machine. These tests ask dpkg which package owns each binary, strongSwan plugin and kernel tool
the project runs, and fail on this machine when that package is not in setup.sh's list. The
Python side is held the same way: every third-party module imported anywhere in the tree comes
from a distribution that a pyproject.toml of the project declares.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from vpnmasq_lab.strongswan import CHARON, PLUGINS, plugin_path

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("src", "lab", "tests", "bench", "fuzz", "scripts")

# Executables run by name (daemon, lab, tests, benchmarks). A new one found by the source scan
# below must be added here, with its package added to scripts/setup.sh.
BINARIES = (
    "ip", "ss", "bridge",                         # iproute2: namespaces, links, sockets
    "nft", "iptables", "iptables-save",           # the datapath's rules
    "iptables-legacy", "iptables-legacy-save",    # diagnose: rules left in the legacy backend
    "conntrack",                                  # kernel NAT comparisons, diagnose
    "sysctl", "modprobe", "taskset", "sleep",     # kernel tools, CPU pinning
    "cat", "sh", "dpkg-query",                    # /proc reads in namespaces, this audit
    "tshark", "tcpdump",                          # captures and checksum verification
    "iperf3", "trafgen", "hping3", "socat",       # traffic in the lab and benchmarks
    "pptpd", "pptpctrl", "pptp",                  # PoPToP server, pptp-linux client
    "swanctl", "openssl",                         # strongSwan control, lab certificates
    "mount",                                      # the lab's private /run per namespace
    "setpriv", "pgrep",                           # the daemon as the unit runs it (uid, caps)
    "tmux", "promtool",                           # `vpnmasq top` as seen; metrics/alert checks
    "turnserver", "turnutils_natdiscovery",       # RFC 5780 NAT behaviour discovery (coturn)
    "keepalived", "conntrackd",                   # the HA pair lab (VRRP, kernel flow sync)
    "dpkg-buildpackage", "dpkg-parsechangelog",   # make deb (scripts/build-deb.sh)
    "dpkg-deb", "lintian", "tar",                 # the packaging test: contents, lintian
)
# Executables run by absolute path.
PATHS = (CHARON,)

_APT_RE = re.compile(r'^APT_PACKAGES="([^"]*)"', re.M)


def apt_packages() -> set[str]:
    m = _APT_RE.search((ROOT / "scripts" / "setup.sh").read_text())
    assert m, "scripts/setup.sh has no APT_PACKAGES=\"...\" list"
    return set(m.group(1).replace("\\\n", " ").split())


def dpkg_owner(path: str) -> str | None:
    """The package that owns ``path`` (following symlinks such as Debian's alternatives).

    Debian 12 merged /usr: a package may have registered the file as /bin/x or /sbin/x."""
    real = os.path.realpath(path)
    for candidate in dict.fromkeys((real, path, real.removeprefix("/usr"), path.removeprefix("/usr"))):
        r = subprocess.run(["dpkg-query", "-S", candidate], capture_output=True, text=True, check=False)
        if r.returncode == 0 and r.stdout:
            return r.stdout.split(":", 1)[0].split(",")[0].strip()
    return None


def system_files() -> dict[str, str | None]:
    """what the project uses -> its path on this machine (None: not installed)"""
    files: dict[str, str | None] = {b: shutil.which(b) for b in BINARIES}
    files.update({p: p if os.path.exists(p) else None for p in PATHS})
    for plugin in PLUGINS.split():
        path = plugin_path(plugin)
        files[f"strongSwan plugin {plugin}"] = path if os.path.exists(path) else None
    return files


pytestmark = pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="not a Debian system")


def test_every_system_file_is_installed_by_setup() -> None:
    wanted = apt_packages()
    missing = {name: None for name, path in system_files().items() if path is None}
    foreign: dict[str, str] = {}
    for name, path in system_files().items():
        if path is None:
            continue
        owner = dpkg_owner(path)
        if owner is None or owner not in wanted:
            foreign[name] = f"{path} (package {owner or 'unknown'})"
    assert not missing, f"not installed on this machine, and so not by scripts/setup.sh: {sorted(missing)}"
    assert not foreign, (
        "these files come from packages that scripts/setup.sh does not install "
        f"(installed by hand?): {foreign}"
    )


def _python_files() -> list[Path]:
    out: list[Path] = []
    for d in SOURCE_DIRS:
        out += [p for p in (ROOT / d).rglob("*.py") if "regressions" not in p.parts]
    return out


def _run_targets(tree: ast.AST) -> set[str]:
    """First elements of list literals that name an executable: ["nft", "-f", ...]."""
    found: set[str] = set()
    exports = {
        id(n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in n.targets)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.List) and node.elts and id(node) not in exports:
            first = node.elts[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                v = first.value
                if re.fullmatch(r"[a-z][a-z0-9_.+-]*", v) and len(node.elts) > 1:
                    found.add(v)
    return found


def test_source_scan_finds_no_unlisted_executable() -> None:
    """A command run as ["tool", args...] anywhere in the tree is on the BINARIES list."""
    used: dict[str, set[str]] = {}
    for path in _python_files():
        for name in _run_targets(ast.parse(path.read_text(), str(path))):
            if shutil.which(name) and name not in ("python", "python3", "vpnmasq"):
                used.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    unlisted = {k: sorted(v) for k, v in used.items() if k not in BINARIES}
    assert not unlisted, f"executables run by the project but not on BINARIES: {unlisted}"


def _declared_distributions() -> set[str]:
    names: set[str] = set()
    for pp in (ROOT / "pyproject.toml", ROOT / "lab" / "pyproject.toml"):
        project = tomllib.loads(pp.read_text())["project"]
        reqs = list(project.get("dependencies", []))
        for extra in project.get("optional-dependencies", {}).values():
            reqs += extra
        names |= {_norm(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in reqs}
        names.add(_norm(project["name"]))
    return names


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_third_party_import_is_declared() -> None:
    local = {"vpnmasq", "vpnmasq_lab", "tests", "bench", "fuzz", "conftest"}
    local |= {p.stem for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py")}
    dists = importlib.metadata.packages_distributions()
    declared = _declared_distributions()
    undeclared: dict[str, set[str]] = {}
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                if top in sys.stdlib_module_names or top in local:
                    continue
                owners = {_norm(d) for d in dists.get(top, [top])}
                if not owners & declared:
                    undeclared.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    assert not undeclared, f"imported but declared in no pyproject.toml: {undeclared}"
