"""``vpnmasq check-config`` tells the truth: one table per promise.

Required keys and the empty file, the line a TOML syntax error is blamed on, which file is read
without FILE, and the checks of this machine (the outside interface, the FORWARD mark rule),
which must agree with ``vpnmasq diagnose`` because they are diagnose's own checks. The machine
checks run on fixture facts here; tests/integration/test_check_config_host.py runs them against
a real interface list and iptables in a network namespace.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from vpnmasq import cli as cli_mod
from vpnmasq.cli import cli
from vpnmasq.config import load_config
from vpnmasq.tools import diagnose as dg

GOOD = 'outside_interface = "wan0"\ninside_networks = ["10.77.0.0/24"]\n'


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


pytestmark = pytest.mark.usefixtures("no_host_config")


# ------------------------------------------------------------------------------ the file
FILES = [
    # (case, text, exit status, the error lines, in order)
    (
        "no outside_interface",
        'inside_networks = ["10.77.0.0/24"]\n',
        1,
        ['outside_interface: required, and not set (the interface that faces the Internet, '
         'e.g. outside_interface = "eth0")'],
    ),
    (
        "no inside_networks",
        'outside_interface = "wan0"\n',
        1,
        ["inside_networks: required, and not set (the LANs to masquerade"],
    ),
    (
        "neither",
        'mode = "hybrid"\n',
        1,
        ["outside_interface: required, and not set", "inside_networks: required, and not set"],
    ),
    (
        "empty file",
        "",
        1,
        ["the file sets nothing: outside_interface and inside_networks are required"],
    ),
    (
        "only comments",
        "# vpnmasq\n\n   # nothing set yet\n",
        1,
        ["the file sets nothing: outside_interface and inside_networks are required"],
    ),
    (
        "unclosed array on line 2 (tomllib gives up on line 3)",
        'outside_interface = "wan0"\ninside_networks = ["10.77.0.0/24",\nmode = "hybrid"\n',
        1,
        ["line 2: inside_networks: not valid TOML: ']' missing; tomllib: Invalid value at line 3"],
    ),
    (
        "unclosed array at the end of the file",
        'outside_interface = "wan0"\ninside_networks = ["10.77.0.0/24",\n',
        1,
        ["line 2: inside_networks: not valid TOML: ']' missing; tomllib: Invalid value at the "
         "end of the file"],
    ),
    (
        "missing comma in a multi-line array",
        'outside_interface = "wan0"\ninside_networks = [\n  "10.77.0.0/24"\n  "10.78.0.0/24",\n]\n',
        1,
        ["line 3: inside_networks: not valid TOML: ']' or ',' missing (the array starts on "
         "line 2)"],
    ),
    (
        "unclosed string",
        'outside_interface = "wan0\ninside_networks = ["10.77.0.0/24"]\n',
        1,
        ["line 1: outside_interface: not valid TOML: Illegal character"],
    ),
    (
        "unclosed multi-line string",
        GOOD + 'on_address_change_hook = """/usr/local/sbin/x\nmode = "hybrid"\n',
        1,
        ["line 3: on_address_change_hook: not valid TOML: this string is not closed"],
    ),
    (
        "garbage where a key should be",
        GOOD + "@mode = 1\n",
        1,
        ["line 3: not valid TOML: Invalid statement"],
    ),
    (
        "a key set twice",
        GOOD + 'mode = "hybrid"\nmode = "userspace"\n',
        1,
        ["line 4: mode: not valid TOML: Cannot overwrite a value"],
    ),
    ("the two required keys", GOOD, 0, []),
]


@pytest.mark.parametrize(
    ("text", "status", "errors"), [c[1:] for c in FILES], ids=[c[0] for c in FILES]
)
def test_check_config_file_errors(tmp_path: Path, text: str, status: int, errors: list[str]) -> None:
    p = tmp_path / "vpnmasq.toml"
    p.write_text(text)
    r = invoke("check-config", "--offline", str(p))
    assert r.exit_code == status, r.output
    lines = r.output.splitlines()
    if status == 0:
        assert lines == [f"OK: {p}"]
        return
    assert len(lines) == len(errors), r.output
    for line, want in zip(lines, errors, strict=True):
        assert line.startswith(f"{p}: {want}"), r.output


def test_run_refuses_a_file_without_the_required_keys(tmp_path: Path) -> None:
    """The same loader: run exits 2 (a configuration error) instead of defaulting to wan0."""
    p = tmp_path / "vpnmasq.toml"
    p.write_text('inside_networks = ["10.77.0.0/24"]\n')
    r = invoke("run", "--config", str(p))
    assert r.exit_code == 2 and "outside_interface: required" in r.output


# ------------------------------------------------------------------------------ which file
WHICH = [
    # (case, FILE given, VPNMASQ_CONFIG given, default file exists, file read or None)
    ("no FILE: the default path", False, False, True, "default"),
    ("no FILE and no default file: an error naming it", False, False, False, None),
    ("no FILE: $VPNMASQ_CONFIG first", False, True, True, "env"),
    ("FILE wins", True, True, True, "arg"),
]


@pytest.mark.parametrize(
    ("arg", "env", "default_exists", "read"), [c[1:] for c in WHICH], ids=[c[0] for c in WHICH]
)
def test_check_config_reads(
    tmp_path: Path, arg: bool, env: bool, default_exists: bool, read: str | None
) -> None:
    paths = {name: tmp_path / f"{name}.toml" for name in ("arg", "env")}
    paths["default"] = Path(cli_mod.DEFAULT_CONFIG)
    for name, p in paths.items():
        if name != "default" or default_exists:
            p.write_text(GOOD)
    args = ["check-config", "--offline"] + ([str(paths["arg"])] if arg else [])
    r = invoke(*args, env={"VPNMASQ_CONFIG": str(paths["env"])} if env else None)
    if read is None:
        assert r.exit_code == 1 and f"cannot read {paths['default']}" in r.output
    else:
        assert r.exit_code == 0 and r.output == f"OK: {paths[read]}\n"


# ------------------------------------------------------------------------------ this machine
IPT_ACCEPT = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
IPT_DROP = (
    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n"
    "-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\nCOMMIT\n"
)
IPT_DROP_MARK = IPT_DROP.replace("COMMIT", "-A FORWARD -m mark --mark 0x564d -j ACCEPT\nCOMMIT")
NFT_DROP = (
    "table inet filter {\n\tchain forward {\n"
    "\t\ttype filter hook forward priority filter; policy drop;\n"
    "\t\tct state established,related accept\n\t}\n}\n"
)
NFT_DROP_MARK = NFT_DROP.replace("related accept\n", "related accept\n\t\tmeta mark 0x0000564d accept\n")
UP = {"lo": [], "wan0": ["198.51.100.1"], "lan0": ["10.77.0.1"]}

HOST = [
    # (case, interfaces, down, iptables-save, nft list ruleset, root, warnings, diagnose's check)
    ("FORWARD policy ACCEPT, no mark rule: nothing to say", UP, set(), IPT_ACCEPT, "", True, [],
     None),
    ("iptables FORWARD policy DROP without the mark rule", UP, set(), IPT_DROP, "", True,
     ["FORWARD drops by default (iptables FORWARD policy DROP) and no rule accepts vpnmasq's "
      "mark 0x564d", "Fix: iptables -A FORWARD -m mark --mark 0x564d -j ACCEPT"], "forward-mark"),
    ("iptables FORWARD policy DROP with the mark rule", UP, set(), IPT_DROP_MARK, "", True, [],
     None),
    ("nft forward chain policy drop without the mark rule", UP, set(), IPT_ACCEPT, NFT_DROP, True,
     ["FORWARD drops by default (nft table inet filter: forward chain with policy drop)"],
     "forward-mark"),
    ("nft forward chain policy drop with meta mark accept", UP, set(), IPT_ACCEPT, NFT_DROP_MARK,
     True, [], None),
    ("outside_interface missing: run waits for it", {"lo": [], "lan0": ["10.77.0.1"]}, set(),
     IPT_ACCEPT, "", True,
     ["outside_interface wan0 does not exist on this machine: vpnmasq run waits for it to appear"],
     "outside-interface"),
    ("outside_interface down: run waits for it", UP, {"wan0"}, IPT_ACCEPT, "", True,
     ["outside_interface wan0 is down: vpnmasq run waits for it to come up. Fix: ip link set "
      "wan0 up"], "outside-interface"),
    ("firewall unreadable without root", UP, set(), None, None, False,
     ["not running as root: skipped the check of the FORWARD chain for vpnmasq's mark"], None),
]


def _facts(
    addresses: dict[str, list[str]], down: set[str], ipt: str | None, nft: str | None, root: bool
) -> dg.Facts:
    return dg.Facts(
        config=load_config(GOOD),
        addresses=addresses,
        down=set(down),
        iptables=ipt,
        nft=nft,
        is_root=root,
    )


@pytest.mark.parametrize(
    ("addresses", "down", "ipt", "nft", "root", "warnings", "check"),
    [c[1:] for c in HOST],
    ids=[c[0] for c in HOST],
)
def test_check_config_checks_this_machine_as_diagnose_does(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    addresses: dict[str, list[str]],
    down: set[str],
    ipt: str | None,
    nft: str | None,
    root: bool,
    warnings: list[str],
    check: str | None,
) -> None:
    facts = _facts(addresses, down, ipt, nft, root)
    monkeypatch.setattr(dg, "gather_host", lambda config: facts)
    p = tmp_path / "vpnmasq.toml"
    p.write_text(GOOD)
    r = invoke("check-config", str(p))
    assert r.exit_code == 0, r.output
    if not warnings:
        assert r.output == f"OK: {p}\n"
    else:
        assert r.output.startswith("warning: ") and r.output.endswith(f"OK: {p} (1 warning)\n")
        for words in warnings:
            assert words in r.output, r.output
    # diagnose, on the same facts, finds a problem exactly where check-config warned
    problems = {fd.check for fd in dg.run_checks(facts) if fd.level >= dg.Level.WARN}
    ours = {"forward-mark", "outside-interface"}
    assert problems & ours == ({check} if check else set())


def test_offline_does_not_look_at_this_machine(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def fail(config: object) -> dg.Facts:
        raise AssertionError("--offline gathered facts")

    monkeypatch.setattr(dg, "gather_host", fail)
    p = tmp_path / "vpnmasq.toml"
    p.write_text(GOOD)
    assert invoke("check-config", "--offline", str(p)).output == f"OK: {p}\n"
