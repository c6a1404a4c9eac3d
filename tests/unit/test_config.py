"""Config loader: good files load, bad ones fail naming the key and its line."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.config_text import missing_lines, with_required
from vpnmasq import config as cfgmod
from vpnmasq.config import (
    ESP_KEYS,
    FORWARD_KEYS,
    LIMIT_KEYS,
    TIMEOUT_KEYS,
    TOP_KEYS,
    Config,
    ConfigError,
    ConfigErrors,
    Forward,
    PortRange,
    explain,
    load_config,
    load_config_file,
    validate,
)

REPO = Path(__file__).resolve().parents[2]

BRIEF_EXAMPLE = """\
outside_interface = "wan0"
inside_networks = ["10.77.0.0/24"]
mode = "hybrid"                     # or "userspace"
[[forward]]                         # publish a PPTP server on the LAN
protocol = "tcp"
port = 1723
to = "10.77.0.5"
[[forward]]
protocol = "gre"
to = "10.77.0.5"
"""

BASE = 'outside_interface = "wan0"\ninside_networks = ["10.77.0.0/24"]\n'


def error_of(text: str) -> ConfigError:
    """The error of a fragment completed with the required keys (lines as in ``text``)."""
    with pytest.raises(ConfigError) as exc:
        load_config(with_required(text))
    err = exc.value
    shift = missing_lines(text)
    for e in err.errors if isinstance(err, ConfigErrors) else [err]:
        if e.line is not None:
            e.line -= shift
            e.args = (re.sub(r"^line \d+", f"line {e.line}", str(e)),)
    if isinstance(err, ConfigErrors):
        err.line = err.errors[0].line
        err.args = ("\n".join(str(e) for e in err.errors),)
    return err


def load(text: str) -> Config:
    return load_config(with_required(text))


# ------------------------------------------------------------------------------ good files
def test_brief_example_loads_exactly() -> None:
    c = load_config(BRIEF_EXAMPLE)
    assert c.outside_interface == "wan0"
    assert c.inside_networks == ("10.77.0.0/24",)
    assert c.mode == "hybrid"
    assert c.forwards == (
        Forward(protocol="tcp", to="10.77.0.5", port=1723),
        Forward(protocol="gre", to="10.77.0.5"),
    )
    assert validate(c, BRIEF_EXAMPLE) == []


def test_required_keys_alone_give_the_defaults() -> None:
    assert load("") == Config()
    assert validate(Config()) == []


def test_sample_config_in_packaging_loads_without_warnings() -> None:
    text = (REPO / "packaging" / "vpnmasq.toml").read_text()
    c = load_config(text)
    assert validate(c, text) == []
    assert c.forwards[0] == Forward("tcp", "10.77.0.5", port=1723)
    # every documented key appears in the sample (commented out or set)
    for spec in TOP_KEYS:
        assert re.search(rf"^#? ?{spec.key} = ", text, re.M), spec.key
    for prefix, specs in (("timeouts", TIMEOUT_KEYS), ("limits", LIMIT_KEYS), ("esp", ESP_KEYS)):
        section = text.split(f"[{prefix}]")[1]
        for spec in specs:
            assert re.search(rf"^{spec.key} = ", section, re.M), f"{prefix}.{spec.key}"


@pytest.mark.parametrize("mode", ["hybrid", "userspace"])
def test_sample_config_switched_to_either_mode_has_no_warnings(mode: str) -> None:
    """An admin who only changes `mode` in the sample gets no warning about keys they never set."""
    text = (REPO / "packaging" / "vpnmasq.toml").read_text()
    text = re.sub(r'^mode = "[a-z]+"', f'mode = "{mode}"', text, count=1, flags=re.M)
    c = load_config(text)
    assert c.mode == mode and validate(c, text) == []


def test_sample_config_sets_the_defaults_it_claims() -> None:
    """Where the sample sets a key, the value is the default (the comments say so)."""
    c = load_config((REPO / "packaging" / "vpnmasq.toml").read_text())
    d = Config()
    same = {f.name for f in dataclasses.fields(Config)} - {
        "inside_networks",
        "state_file",
        "forwards",
    }
    for name in same:
        assert getattr(c, name) == getattr(d, name), name


def test_port_range_forms_are_equivalent() -> None:
    a = load('port_range = "62000-65000"\n')
    b = load("port_range = [62000, 65000]\n")
    assert a.port_range == b.port_range == PortRange(62000, 65000)


def test_networks_are_normalized() -> None:
    c = load('inside_networks = ["10.77.0.1/24", "192.168.5.9"]\n')
    assert c.inside_networks == ("10.77.0.0/24", "192.168.5.9/32")


def test_tables_inline_and_dotted_forms() -> None:
    a = load("timeouts = { udp = 400, icmp = 90 }\n")
    b = load("timeouts.udp = 400\ntimeouts.icmp = 90\n")
    c = load("[timeouts]\nudp = 400\nicmp = 90\n")
    assert a.timeouts == b.timeouts == c.timeouts
    assert a.timeouts.udp == 400.0 and a.timeouts.tcp_established == 7440.0


def test_specific_forward_may_overlap_a_general_one() -> None:
    """The engine tries port rules before protocol rules and remote rules before open ones."""
    text = BASE + (
        '[[forward]]\nprotocol = "tcp"\nto = "10.77.0.5"\n'
        '[[forward]]\nprotocol = "tcp"\nport = 22\nto = "10.77.0.6"\n'
        '[[forward]]\nprotocol = "tcp"\nport = 22\nto = "10.77.0.7"\nremote = "203.0.113.0/24"\n'
    )
    c = load(text)
    assert len(c.forwards) == 3
    assert c.forwards[2].remote == "203.0.113.0/24"


def test_userspace_mode_ignores_kernel_port_range_overlap() -> None:
    text = 'mode = "userspace"\nport_range = "40000-50000"\nkernel_port_range = "32768-60999"\n'
    c = load(text)
    assert validate(c, text) == [
        "line 3: kernel_port_range: only used in hybrid mode; ignored in userspace mode"
    ]


def test_forward_to_port_and_remote_address() -> None:
    c = load(
        BASE + '[[forward]]\nprotocol = "udp"\nport = 500\nto_port = 500\nto = "10.77.0.5"\n'
        'remote = "203.0.113.7"\n'
    )
    assert c.forwards[0] == Forward("udp", "10.77.0.5", 500, 500, "203.0.113.7/32")


# ------------------------------------------------------------------------------ errors
BAD = [
    # (text, key, line, words)
    ("mdoe = 'hybrid'\n", "mdoe", 1, "unknown key 'mdoe' (did you mean 'mode'?)"),
    ("\n\n[limit]\nmax_entries = 5\n", "limit", 3, "(did you mean 'limits'?)"),
    (
        "[timeouts]\nudp = 300\ntcp_establihsed = 9000\n",
        "timeouts.tcp_establihsed",
        3,
        "(did you mean 'tcp_established'?)",
    ),
    (
        BASE + '[[forward]]\nprotocol = "tcp"\nport = 80\nto = "10.77.0.5"\nmode = "userspace"\n',
        "forward[1].mode",
        7,
        "'mode' is a top-level key: move it above line 3",
    ),
    ('mode = "hybird"\n', "mode", 1, "(did you mean 'hybrid'?)"),
    ("udp = 60\n", "udp", 1, "'udp' belongs in the [timeouts] table: did you mean 'timeouts.udp'?"),
    ('to = "10.77.0.5"\n', "to", 1, "'to' belongs in a [[forward]] table"),
    ("mode = 5\n", "mode", 1, "expected a string, got an integer"),
    ('preserve_ports = "yes"\n', "preserve_ports", 1, "expected true or false"),
    ("queue_num = true\n", "queue_num", 1, "expected an integer, got a boolean"),
    ("queue_num = 70000\n", "queue_num", 1, "out of range 0..65535"),
    ("[limits]\nmax_entries = 1.5\n", "limits.max_entries", 2, "expected an integer"),
    (
        'inside_networks = [\n  "10.77.0.0/24",\n  "10.78.0.300/24",\n]\n',
        "inside_networks[2]",
        3,
        "not an IPv4 network",
    ),
    ("inside_networks = []\n", "inside_networks", 1, "at least one network"),
    ('public_address = "10.77.0.1"\n' + BASE, "public_address", 1, "inside the inside network"),
    ('public_address = "198.51.100.300"\n', "public_address", 1, "not an IPv4 address"),
    (
        BASE + '[[forward]]\nprotocol = "tcp"\nport = 80\nto = "192.168.9.9"\n',
        "forward[1].to",
        6,
        "not inside any inside network",
    ),
    (
        BASE + '[[forward]]\nprotocol = "tcp"\nport = 80\nto = "10.77.0.255"\n',
        "forward[1].to",
        6,
        "broadcast address",
    ),
    (
        BASE + '[[forward]]\nprotocol = "gre"\nto = "10.77.0.5"\nport = 1723\n',
        "forward[1].port",
        6,
        "gre has no ports",
    ),
    (
        BASE + '[[forward]]\nprotocol = "esp"\nto = "10.77.0.5"\nto_port = 1\n',
        "forward[1].to_port",
        6,
        "esp has no ports",
    ),
    (
        BASE + '[[forward]]\nprotocol = "tcp"\nto = "10.77.0.5"\nto_port = 8080\n',
        "forward[1].to_port",
        6,
        "'to_port' needs 'port'",
    ),
    (
        BASE + '[[forward]]\nprotocol = "icmp"\nto = "10.77.0.5"\n',
        "forward[1].protocol",
        4,
        'not one of "tcp", "udp", "gre", "esp"',
    ),
    (
        BASE
        + '[[forward]]\nprotocol = "tcp"\nport = 1\nto = "10.77.0.5"\n\n[[forward]]\nport = 2\n'
        'protocol = "tcp"\n',
        "forward[2].to",
        8,
        "'to' is required",
    ),
    (
        BASE + '[[forward]]\nprotocol = "tcp"\nport = 1723\nto = "10.77.0.5"\n'
        '[[forward]]\nprotocol = "tcp"\nport = 1723\nto = "10.77.0.6"\n',
        "forward[2]",
        7,
        "duplicate forward: tcp port 1723 is already forwarded by forward[1] at line 3",
    ),
    (
        BASE + '[[forward]]\nprotocol = "gre"\nto = "10.77.0.5"\nremote = "203.0.113.0/24"\n'
        '[[forward]]\nprotocol = "gre"\nto = "10.77.0.6"\nremote = "203.0.113.128/25"\n',
        "forward[2]",
        7,
        "overlaps forward[1] at line 3",
    ),
    ('[forward]\nprotocol = "tcp"\n', "forward", 1, "[[forward]]"),
    ("port_range = [40000, 50000]\n", "port_range", 1, "overlaps kernel_port_range 32768-60999"),
    ('port_range = "61000:65535"\n', "port_range", 1, 'such as "61000-65535"'),
    ('low_port_range = "900-800"\n', "low_port_range", 1, "low <= high"),
    (
        'low_port_range = "600-61500"\nmode = "userspace"\nport_range = "61000-65535"\n',
        "low_port_range",
        1,
        "overlaps port_range 61000-65535",
    ),
    ("[timeouts]\nudp = -5\n", "timeouts.udp", 2, "must be > 0"),
    ("timeouts = { udp = 0 }\n", "timeouts.udp", 1, "must be > 0"),
    ('\ntimeouts.icmp = "60"\n', "timeouts.icmp", 2, "expected a number"),
    ("timeouts = 5\n", "timeouts", 1, "must be a table ([timeouts])"),
    ('helpers = ["isakmp", "pptpp"]\n', "helpers[2]", 1, "(did you mean 'pptp'?)"),
    ('helpers = ["esp", "esp"]\n', "helpers[2]", 1, "listed twice"),
    ('control_socket = "run/vpnmasq.sock"\n', "control_socket", 1, "absolute path"),
    (f'control_socket = "/{"x" * 120}"\n', "control_socket", 1, "at most 107"),
    ('outside_interface = "a-very-long-interface"\n', "outside_interface", 1, "at most 15"),
    ('metrics_listen = "127.0.0.1"\n', "metrics_listen", 1, '"address:port"'),
    ("mark = 0\n", "mark", 1, "out of range"),
    ('[esp]\nparallel_sessions = "no"\n', "esp.parallel_sessions", 2, "expected true or false"),
    # TOML syntax errors keep tomllib's words, with the key of that line
    ('mode = "hybrid"\nqueue_num = 5 5\n', "queue_num", 2, "not valid TOML"),
    ('mode = "hybrid"\nmode = "userspace"\n', "mode", 2, "not valid TOML: Cannot overwrite"),
    ('inside_networks = ["10.0.0.0/8",\n', "inside_networks", 1, "not valid TOML"),
]


@pytest.mark.parametrize(("text", "key", "line", "words"), BAD)
def test_error_names_key_and_line(text: str, key: str, line: int, words: str) -> None:
    err = error_of(text)
    assert (err.key, err.line) == (key, line), str(err)
    assert words in str(err)
    assert str(err).startswith(f"line {line}: {key}: ")


def test_all_errors_are_reported_in_line_order() -> None:
    text = 'mdoe = "x"\n[timeouts]\nudp = -1\n[limits]\nmax_entries = "many"\n'
    err = error_of(text)
    assert isinstance(err, ConfigErrors)
    assert [(e.key, e.line) for e in err.errors] == [
        ("mdoe", 1),
        ("timeouts.udp", 3),
        ("limits.max_entries", 5),
    ]
    assert (err.key, err.line) == ("mdoe", 1)
    assert str(err).count("\n") == 2


def test_validate_rejects_a_hand_built_config_without_lines() -> None:
    bad = Config(inside_networks=("10.77.0.0/24",), forwards=(Forward("tcp", "192.0.2.1", 80),))
    with pytest.raises(ConfigError) as exc:
        validate(bad)
    assert exc.value.key == "forward[1].to" and exc.value.line is None


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config_file(tmp_path / "missing.toml")
    p = tmp_path / "latin1.toml"
    p.write_bytes('outside_interface = "w\xe4n"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config_file(p)
    p.write_text(BRIEF_EXAMPLE)
    assert load_config_file(p).mode == "hybrid"
    p.write_bytes(b"\xef\xbb\xbf" + BRIEF_EXAMPLE.encode())  # saved by an editor that writes a BOM
    assert load_config_file(p) == load_config(BRIEF_EXAMPLE)


# ------------------------------------------------------------------------------ warnings
WARN = [
    ("[timeouts]\nudp = 60\n", "line 2: timeouts.udp: 60 s is below the RFC 4787 REQ-5 minimum"),
    (
        "[timeouts]\ntcp_established = 3600\n",
        "line 2: timeouts.tcp_established: 3600 s is below the RFC 5382 REQ-5 minimum of 7440 s",
    ),
    ("[timeouts]\ntcp_transitory = 100\n", "RFC 5382 REQ-5 minimum of 240 s"),
    ("[timeouts]\nicmp = 30\n", "RFC 5508 REQ-1a minimum of 60 s"),
    ("[timeouts]\nesp = 1800\n", "line 2: timeouts.esp: 1800 s is shorter than a typical 1 h"),
    ("[timeouts]\nisakmp = 3600\nesp = 4000\n", "line 2: timeouts.isakmp"),
    ("[timeouts]\nesp_pending = 40\n", "timeouts.esp_pending"),
    (
        BASE + '[[forward]]\nprotocol = "udp"\nto = "10.77.0.5"\n',
        "line 3: forward[1]: no port: every inbound udp packet",
    ),
    (
        BASE + '[[forward]]\nprotocol = "udp"\nport = 51820\nto = "10.77.0.5"\n',
        "line 5: forward[1].port: port 51820 is inside kernel_port_range",
    ),
    ("fail_open = true\n", "line 1: fail_open: true: while vpnmasq is down"),
    ('helpers = ["gre"]\n', "line 1: helpers: 'gre' without 'pptp'"),
    ('helpers = ["esp"]\n', "line 1: helpers: 'esp' without 'isakmp'"),
    (
        'inside_networks = ["10.0.0.0/8", "10.77.0.0/24"]\n',
        "inside_networks[1]: 10.0.0.0/8 overlaps",
    ),
    (BASE + 'exempt_networks = ["198.51.100.0/28"]\n', "line 3: exempt_networks[1]"),
    ("[limits]\nmax_entries = 10\nmax_entries_per_host = 20\n", "limits.max_entries_per_host"),
]


@pytest.mark.parametrize(("text", "words"), WARN)
def test_risky_values_load_with_a_warning(text: str, words: str) -> None:
    c = load(text)
    warnings = validate(c, text)  # lines as in the fragment
    assert any(words in w for w in warnings), warnings


def test_warnings_without_text_have_no_line() -> None:
    c = dataclasses.replace(Config(), timeouts=cfgmod.Timeouts(udp=30.0))
    assert validate(c) == [
        "timeouts.udp: 30 s is below the RFC 4787 REQ-5 minimum of 120 s; idle flows will lose "
        "their mapping"
    ]


# ------------------------------------------------------------------------------ explain
def test_explain_documents_every_key() -> None:
    text = explain()
    for spec in TOP_KEYS:
        assert f"\n{spec.key}  (" in text
    for prefix, specs in (("timeouts.", TIMEOUT_KEYS), ("limits.", LIMIT_KEYS), ("esp.", ESP_KEYS)):
        for spec in specs:
            assert f"\n{prefix}{spec.key}  (" in text
    for spec in FORWARD_KEYS:
        assert f"\n{spec.key}  (" in text
    assert 'port_range  (port range "lo-hi" or [lo, hi], or "auto"; default "auto")' in text
    assert 'limits.max_ports_per_host  (integer >= 0 (0 = unlimited) or "auto"; default "auto")' in text
    assert "mark  (integer 1..0xFFFFFFFF; default 0x564D)" in text
    assert "\nto  (IPv4 address; required)" in text


def test_explain_markdown_has_one_row_per_key() -> None:
    md = explain("markdown")
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    total = len(TOP_KEYS) + len(TIMEOUT_KEYS) + len(LIMIT_KEYS) + len(ESP_KEYS) + len(FORWARD_KEYS)
    total += len(cfgmod.ROUTE_KEYS) + len(cfgmod.SYNC_KEYS)
    assert len(rows) == total
    assert "| `timeouts.udp` | seconds | `300` |" in md


def test_default_helpers_are_all_known() -> None:
    assert set(Config().helpers) <= set(cfgmod.KNOWN_HELPERS)


# ------------------------------------------------------------------------------ line finder
def test_locator_survives_tricky_toml() -> None:
    text = (
        '# a comment with key = "value" and [table]\n'  # 1
        'outside_interface = "w#0"  # "#" inside a string\n'  # 2
        "state_file = '''\n"  # 3
        "not = a key\n"  # 4
        "[not a table]'''\n"  # 5
        '"quoted.key" = 1\n'  # 6
        "forward = [\n"  # 7
        '  { protocol = "tcp", port = 1, to = "10.0.0.5" },\n'  # 8
        '  { protocol = "udp",\n'  # 9 (invalid TOML but scanned)
        "  },\n"  # 10
        "]\n"  # 11
        "[esp]\n"  # 12
        "max_pending_per_host = 3\n"  # 13
    )
    loc = cfgmod.Locator(text)
    assert loc.line("outside_interface") == 2
    assert loc.line("state_file") == 3
    assert loc.line("quoted.key") == 6
    assert loc.line("forward[1].port") == 8
    assert loc.line("forward[2].protocol") == 9
    assert loc.line("forward[2].to") == 9  # missing: falls back to its element
    assert loc.line("esp.max_pending_per_host") == 13
    assert loc.line("not") is None


def test_array_of_tables_elements_are_numbered_from_one() -> None:
    loc = cfgmod.Locator(BRIEF_EXAMPLE)
    assert loc.line("forward[1]") == 4
    assert loc.line("forward[1].to") == 7
    assert loc.line("forward[2]") == 8
    assert loc.line("forward[2].protocol") == 9


_key = st.sampled_from([s.key for s in TIMEOUT_KEYS])
_junk = st.sampled_from(["", "# comment = 1", "   ", "# [x]"])


@settings(max_examples=60, deadline=None)
@given(
    keys=st.lists(_key, min_size=1, max_size=8, unique=True),
    junk=st.lists(_junk, min_size=8, max_size=8),
    bad_index=st.integers(min_value=0, max_value=7),
)
def test_bad_timeout_is_reported_on_its_own_line(
    keys: list[str], junk: list[str], bad_index: int
) -> None:
    bad_index %= len(keys)
    lines = ["[timeouts]"]
    where = {}
    for i, k in enumerate(keys):
        lines.append(junk[i])
        value = "-1" if i == bad_index else "500"
        lines.append(f"{k} = {value}")
        where[k] = len(lines)
    err = error_of("\n".join(lines) + "\n")
    bad = keys[bad_index]
    assert (err.key, err.line) == (f"timeouts.{bad}", where[bad])


# ------------------------------------------------------------------------------ [sync]
SYNC_OK = """\
outside_interface = "wan0"
inside_networks = ["10.77.0.0/24"]
public_address = "198.51.100.1"
[sync]
peer = "10.99.0.2:3790"
listen = "10.99.0.1:3790"
key_file = "/etc/vpnmasq/sync.key"
node = 2
"""


def test_sync_section_loads_and_is_off_by_default() -> None:
    assert not Config().sync.enabled
    c = load_config(SYNC_OK)
    assert c.sync.enabled
    assert (c.sync.peer, c.sync.listen, c.sync.node) == ("10.99.0.2:3790", "10.99.0.1:3790", 2)
    assert c.sync.full_sync_interval == 10.0


@pytest.mark.parametrize(
    "edit, key, words",
    [
        ('public_address = "198.51.100.1"\n', "sync.peer", "needs public_address"),
        ('key_file = "/etc/vpnmasq/sync.key"\n', "sync.peer", "needs sync.key_file"),
        ("node = 2\n", None, None),
        ('peer = "10.99.0.2:3790"\n', "sync.listen", "needs sync.peer"),
    ],
)
def test_sync_section_needs_its_companions(edit: str, key: str | None, words: str | None) -> None:
    text = SYNC_OK.replace(edit, "")
    if key is None:
        assert load_config(text).sync.node == 1
        return
    with pytest.raises(ConfigError) as exc:
        load_config(text)
    assert key in str(exc.value) and words in str(exc.value)


def test_sync_node_is_1_or_2() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(SYNC_OK.replace("node = 2", "node = 3"))
    assert "sync.node" in str(exc.value)


def test_explain_documents_sync() -> None:
    text = explain()
    for spec in cfgmod.SYNC_KEYS:
        assert f"\nsync.{spec.key}  (" in text


# --------------------------------------------------------------------- interface names
#: (name, words of the error): the kernel's dev_valid_name() rules, then what the rule text
#: can carry (a '"' ends an nft string, '+' is an iptables wildcard, '!' a negation)
BAD_IFNAMES = [
    ("a" * 16, "is 16 bytes; the kernel allows at most 15"),
    ("wän0123456789ab", "is 16 bytes"),  # 15 characters, 16 bytes
    (".", "reserved by the kernel"),
    ("..", "reserved by the kernel"),
    ("wan/0", "contains '/'"),
    ("wan:0", "contains ':'"),
    ("wan 0", "whitespace (' ')"),
    ("wan\t0", "whitespace ('\\t')"),
    ("wan\n0", "whitespace ('\\n')"),
    ("wan\u00a00", "whitespace ('\\xa0')"),
    ("wan\x000", "NUL byte"),
    ('wan0"', "contains '\"': vpnmasq writes interface names into nftables/iptables rules"),
    ("wan+", "contains '+'"),
    ("!wan0", "contains '!'"),
    ("wan;0", "contains ';'"),
    ("wan\\0", "contains '\\\\'"),
    ("wän0", "contains 'ä'"),
    ("wan{0}", "contains '{' '}'"),
]


@pytest.mark.parametrize(("name", "words"), BAD_IFNAMES)
def test_bad_interface_names_are_refused_with_the_reason(name: str, words: str) -> None:
    toml = f"outside_interface = {json.dumps(name)}\n"  # line 1: the rest follows
    with pytest.raises(ConfigError, match="line 1: outside_interface: ") as err:
        load_config(toml + 'inside_networks = ["10.77.0.0/24"]\n')
    assert words in str(err.value)
    assert cfgmod.interface_name_problem(name) is not None


def test_an_empty_interface_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="outside_interface: must not be empty"):
        load_config('outside_interface = ""\ninside_networks = ["10.77.0.0/24"]\n')


@pytest.mark.parametrize("name", ["a" * 15, "wan0", "eth0.100", "br-lan", "ppp_0", "veth@if3", "x"])
def test_good_interface_names_load_and_reach_the_rules(name: str) -> None:
    from vpnmasq.datapath.rules import RuleSpec, iptables_rules

    c = load_config(with_required(f'outside_interface = "{name}"\n'))
    assert c.outside_interface == name
    assert f"-o {name} " in iptables_rules(RuleSpec(name, ["10.0.0.0/8"]))


def test_the_rule_layer_refuses_what_the_config_refuses() -> None:
    from vpnmasq.datapath.rules import RuleSpec

    for name, _ in BAD_IFNAMES:
        with pytest.raises(ValueError, match="invalid interface name"):
            RuleSpec(name, ["10.0.0.0/8"])


# --------------------------------------------------------------------- defaults
def test_defaults_limits_auto_and_port_range_auto() -> None:
    c = load_config(with_required(""))
    assert c.port_range is None
    assert c.limits.max_entries_per_host is None and c.limits.max_ports_per_host is None
    assert c.limits.max_new_per_host_per_second == cfgmod.DEFAULT_NEW_PER_HOST_PER_SECOND
    again = load_config(with_required('port_range = "auto"\n[limits]\nmax_ports_per_host = "auto"\n'
                                      'max_entries_per_host = "auto"\n'))
    assert again == c
    off = load_config(with_required("[limits]\nmax_ports_per_host = 0\nmax_entries_per_host = 0\n"
                                    "max_new_per_host_per_second = 0\n"))
    assert (off.limits.max_ports_per_host, off.limits.max_entries_per_host) == (0, 0)
    with pytest.raises(ConfigError, match='limits.max_ports_per_host: expected "auto" or an integer'):
        load_config(with_required('[limits]\nmax_ports_per_host = "some"\n'))


def test_explain_says_how_auto_limits_are_sized() -> None:
    text = explain()
    assert "limits.max_new_per_host_per_second  (number >= 0 (0 = unlimited); default 500)" in text


def test_offload_is_auto_on_in_hybrid_mode_only_and_explain_says_why() -> None:
    hybrid = load_config(with_required(""))
    assert hybrid.offload is None and hybrid.offload_on is True
    userspace = load_config(with_required('mode = "userspace"\n'))
    assert userspace.offload_on is False
    assert load_config(with_required('mode = "userspace"\noffload = true\n')).offload_on is True
    assert load_config(with_required("offload = false\n")).offload_on is False
    assert load_config(with_required('offload = "auto"\n')) == hybrid
    with pytest.raises(ConfigError, match="offload: expected true or false"):
        load_config(with_required('offload = "yes"\n'))
    text = " ".join(explain().split())
    assert 'offload (true | false | "auto"; default "auto")' in text
    assert "changes nothing but speed" in text and "docs/SECURITY.md lists the tests" in text


def test_docs_config_md_is_the_generated_reference() -> None:
    """docs/CONFIG.md is ``explain("markdown")``: regenerate it when a key changes."""
    assert (REPO / "docs" / "CONFIG.md").read_text() == explain("markdown") + "\n"


def test_the_config_knows_exactly_the_helpers_the_registry_ships() -> None:
    """config sits below helpers (it cannot import the registry), so the two name lists are
    kept in step here: a helper added to helpers.SHIPPED must be named in KNOWN_HELPERS."""
    from vpnmasq.helpers import available

    assert sorted(cfgmod.KNOWN_HELPERS) == available()
