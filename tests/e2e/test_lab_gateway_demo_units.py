"""Pure parts of the lab's vpnmasq gateway, pcap reader and demo (no namespaces needed)."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from vpnmasq.config import load_config
from vpnmasq.events import Row
from vpnmasq_lab.demo import Session, SessionSpec, main, plan_sessions, table_text
from vpnmasq_lab.gateway import lab_config, to_toml
from vpnmasq_lab.pcap import PROTO_ESP, PROTO_GRE, PROTO_UDP, read_ipv4

pytestmark = pytest.mark.e2e


# ------------------------------------------------------------------------------ config
def test_lab_config_loads_with_forwards_and_merged_overrides(tmp_path: Path) -> None:
    doc = lab_config(
        tmp_path,
        mode="userspace",
        forwards=[
            {"protocol": "tcp", "port": 1723, "to": "10.77.0.5"},
            {"protocol": "gre", "to": "10.77.0.5"},
        ],
        overrides={"timeouts": {"udp": 150.0}, "esp": {"guess_single_host": True}},
    )
    cfg = load_config(to_toml(doc))
    assert cfg.mode == "userspace"
    assert cfg.outside_interface == "wan0" and cfg.inside_networks == ("10.77.0.0/24",)
    assert cfg.public_address == "198.51.100.1"
    assert cfg.control_socket == str(tmp_path / "control.sock")
    assert [(f.protocol, f.port, f.to) for f in cfg.forwards] == [
        ("tcp", 1723, "10.77.0.5"),
        ("gre", None, "10.77.0.5"),
    ]
    assert cfg.timeouts.udp == 150.0 and cfg.timeouts.tcp_established == 7440.0
    assert cfg.esp.guess_single_host is True


def test_lab_config_rejects_unknown_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        lab_config(tmp_path, mode="kernel")


def test_to_toml_escapes_strings() -> None:
    text = to_toml({"log_level": 'in"fo\\', "inside_networks": ["10.0.0.0/8"]})
    import tomllib

    assert tomllib.loads(text) == {"log_level": 'in"fo\\', "inside_networks": ["10.0.0.0/8"]}


# -------------------------------------------------------------------------------- pcap
def _ip(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    return (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(payload),
            1,
            0,
            64,
            proto,
            0,
            socket.inet_aton(src),
            socket.inet_aton(dst),
        )
        + payload
    )


def _pcap(frames: list[bytes]) -> bytes:
    out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    for i, ip in enumerate(frames):
        eth = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip
        out += struct.pack("<IIII", 100 + i, 5, len(eth), len(eth)) + eth
    return out


def test_read_ipv4_ports_spi_and_gre_call_id(tmp_path: Path) -> None:
    gre = struct.pack("!HHHH", 0x3001, 0x880B, 12, 4711) + struct.pack("!I", 1) + bytes(12)
    frames = [
        _ip("198.51.100.1", "198.51.100.20", PROTO_UDP, struct.pack("!HHHH", 500, 500, 8, 0)),
        _ip("198.51.100.20", "198.51.100.1", PROTO_GRE, gre),
        _ip("198.51.100.1", "198.51.100.20", PROTO_ESP, struct.pack("!II", 0x1001, 1) + bytes(8)),
    ]
    path = tmp_path / "x.pcap"
    path.write_bytes(_pcap(frames))
    udp, g, esp = read_ipv4(path)
    assert (udp.src, udp.sport, udp.dport, udp.proto) == ("198.51.100.1", 500, 500, PROTO_UDP)
    assert (g.src, g.dst, g.call_id) == ("198.51.100.20", "198.51.100.1", 4711)
    assert esp.spi == 0x1001 and esp.sport is None
    assert udp.ts == pytest.approx(100.000005)


# -------------------------------------------------------------------------------- demo
def test_plan_six_hosts() -> None:
    plan = plan_sessions(6)
    kinds = [s.kind for s in plan]
    assert kinds.count("pptp") == 3 and kinds.count("pptp-in") == 1
    assert kinds.count("ipsec-natt") == 1 and kinds.count("raw-esp") == 2
    assert kinds.count("web") == 6
    assert len({s.key for s in plan}) == len(plan)
    esp = [s for s in plan if s.kind == "raw-esp"]
    assert {s.server for s in esp} | {s.server for s in plan if s.kind == "ipsec-natt"} == {"r2"}
    spis = [x for s in esp for x in (s.spis or ())]
    assert len(set(spis)) == 4


def test_plan_without_pptp_or_strongswan() -> None:
    plan = plan_sessions(4, pptp=False, strongswan=False)
    assert {s.kind for s in plan} == {"raw-esp", "web"}
    assert len([s for s in plan if s.kind == "raw-esp"]) == 4


def _session(**counts: int) -> Session:
    s = Session(SessionSpec("esp-h5", "raw-esp", "h5", "r2", (1, 2)), None, None, 0.0)  # type: ignore[arg-type]
    for k, v in counts.items():
        setattr(s, k, v)
    return s


def test_session_verdicts_and_reasons() -> None:
    assert _session(out=3, back=3, verified=3, expected=3).result().ok
    r = _session(out=9, back=0, verified=0, expected=3).result()
    assert not r.ok and r.reason == "nothing came back (9 sent)"
    r = _session(out=3, back=2, verified=2, expected=3).result()
    assert not r.ok and r.reason == "only 2 of 3 echoes came back"
    r = _session(out=3, back=4, verified=3, expected=3, crosstalk=1).result()
    assert not r.ok and r.reason.startswith("cross-talk: 1 packets")
    s = _session()
    s.error = "IKE failed"
    assert s.result().reason == "IKE failed"


def test_table_text_groups_by_kind_and_limits_plain_rows() -> None:
    esp = Row("esp", "10.77.0.15", "198.51.100.1", "198.51.100.21", "ESTABLISHED", 60.0,
              detail={"spi_out": "0x00001005", "spi_in": "0x00002005", "assoc": "established",
                      "how": "serialized"})  # fmt: skip
    tcp = [
        Row(
            "tcp",
            f"10.77.0.11:{40000 + i}",
            f"198.51.100.1:{61000 + i}",
            "198.51.100.22:80",
            "ESTABLISHED",
            60.0,
        )  # fmt: skip
        for i in range(5)
    ]
    text = table_text([*tcp, esp], plain_limit=2)
    assert text.index("[esp]") < text.index("[tcp]")
    assert "SPI-OUT" in text and "0x00001005" in text
    assert text.count("10.77.0.11:") == 2 and "... and 3 more tcp entries" in text


@pytest.mark.parametrize("argv", [["--hosts", "1"], ["--hosts", "21"], ["--duration", "0"]])
def test_demo_rejects_bad_options(argv: list[str]) -> None:
    assert main(argv) == 2
