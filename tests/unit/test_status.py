"""Status rendering on fixture rows: text columns, filters, JSON, wire round trip, rich."""

from __future__ import annotations

import json
import math

import pytest
from rich.console import Console

from vpnmasq.events import Row
from vpnmasq.status import filter_rows, kind_of, rows_from_wire, rows_to_wire, status_payload
from vpnmasq.tools.status import format_bytes, format_expires, render_json, render_text, rich_table

PUB = "198.51.100.1"
ROWS = [
    Row(
        "tcp",
        "10.77.0.11:40001",
        f"{PUB}:61001",
        "203.0.113.9:80",
        "ESTABLISHED",
        7300.0,
        12,
        10,
        2048,
        150_000,
    ),
    Row("udp", "10.77.0.12:40000", f"{PUB}:61002", "203.0.113.9:53", "napt", 42.4, 1, 1, 60, 120),
    Row("icmp", "10.77.0.11 id=7", f"{PUB} id=7", "203.0.113.9", "query", 59.0, 3, 3, 252, 252),
    Row(
        "esp",
        "10.77.0.11",
        PUB,
        "203.0.113.50",
        "ASSOCIATED",
        4100.0,
        500,
        480,
        600_000,
        580_000,
        {
            "spi_out": "0xc0ffee01",
            "spi_in": "0x0badf00d",
            "assoc": "ASSOCIATED",
            "how": "serialized",
        },
    ),
    Row(
        "esp",
        "10.77.0.12",
        PUB,
        "203.0.113.50",
        "PENDING",
        1.5,
        1,
        0,
        120,
        0,
        {
            "spi_out": "0xc0ffee02",
            "spi_in": "-",
            "assoc": "PENDING",
            "how": "pending",
            "queue": "1/2",
        },
    ),
    Row(
        "udp",
        "10.77.0.12:500",
        f"{PUB}:500",
        "203.0.113.50:500",
        "isakmp",
        14000.0,
        6,
        6,
        3000,
        3000,
        {"icookie": "1122334455667788", "rcookie": "99aabbccddeeff00", "version": "IKEv1"},
    ),
    Row(
        "gre",
        "10.77.0.13",
        PUB,
        "203.0.113.60",
        "CALL",
        7000.0,
        99,
        98,
        9000,
        9000,
        {
            "call_id_inside": "1",
            "call_id_outside": "61007",
            "peer_call_id": "4242",
            "lan_role": "pac",
        },
        offloaded=True,
    ),
    Row("tcp", "10.77.0.5:1723", f"{PUB}:1723", "*", "forward", math.inf),
]
COUNTERS = {"packets_out": 1234, "packets_in": 1100, "drop:no-mapping": 3}


def lines_of(text: str) -> list[str]:
    return text.splitlines()


def test_text_has_conntrack_like_columns_and_counters() -> None:
    out = render_text(ROWS, COUNTERS)
    header = lines_of(out)[0]
    for col in (
        "PROTO",
        "INSIDE",
        "OUTSIDE",
        "REMOTE",
        "STATE",
        "EXPIRES",
        "PKTS OUT/IN",
        "BYTES OUT/IN",
        "DETAIL",
    ):
        assert col in header
    assert "8 entries" in out
    assert "counters:" in out and "drop:no-mapping  3" in out
    tcp = next(line for line in lines_of(out) if "10.77.0.11:40001" in line)
    assert "ESTABLISHED" in tcp and "2h01m" in tcp and "12/10" in tcp and "2.0K/146K" in tcp
    forward = next(line for line in lines_of(out) if "10.77.0.5:1723" in line)
    assert "never" in forward


def test_rows_are_sorted_by_protocol_then_inside_address() -> None:
    shown = filter_rows(ROWS)
    assert [r.proto for r in shown] == ["esp", "esp", "gre", "icmp", "tcp", "tcp", "udp", "udp"]
    tcp = [r.inside for r in shown if r.proto == "tcp"]
    assert tcp == ["10.77.0.5:1723", "10.77.0.11:40001"]  # numeric, not string order


def test_mixed_protocols_show_details_as_key_value() -> None:
    out = render_text(ROWS, {})
    esp = next(line for line in lines_of(out) if "10.77.0.11 " in line and line.startswith("esp"))
    assert esp.endswith("spi_out=0xc0ffee01 spi_in=0x0badf00d assoc=ASSOCIATED how=serialized")
    isakmp = next(line for line in lines_of(out) if "10.77.0.12:500" in line)
    assert isakmp.startswith("isakmp ")  # helper kind shown instead of plain udp
    assert "icookie=1122334455667788 rcookie=99aabbccddeeff00 version=IKEv1" in isakmp
    gre = next(line for line in lines_of(out) if "10.77.0.13" in line)
    assert "CALL [offload]" in gre
    assert "call_id_inside=1 call_id_outside=61007 peer_call_id=4242 lan_role=pac" in gre


def test_one_protocol_gets_dedicated_detail_columns() -> None:
    out = render_text(ROWS, {}, proto="esp")
    lines = lines_of(out)
    assert lines[0].split()[-5:] == ["SPI-OUT", "SPI-IN", "ASSOC", "HOW", "DETAIL"]
    assert lines[1].split()[-4:] == ["0xc0ffee01", "0x0badf00d", "ASSOCIATED", "serialized"]
    # inbound SPI not known yet; keys without a column go to DETAIL
    assert lines[2].split()[-5:] == ["0xc0ffee02", "-", "PENDING", "pending", "queue=1/2"]
    assert "2 of 8 entries shown" in out
    gre = lines_of(render_text(ROWS, {}, proto="gre"))
    assert gre[0].split()[-4:] == ["CALL-IN", "CALL-OUT", "PEER-CALL", "DETAIL"]
    assert gre[1].split()[-4:] == ["1", "61007", "4242", "lan_role=pac"]


def test_helper_rows_on_tcp_and_udp_are_recognised() -> None:
    pptp = Row(
        "tcp", "10.77.0.13:1100", f"{PUB}:61010", "203.0.113.60:1723", "ESTABLISHED", 7000.0,
        detail={"alg": "pptp", "control": "established", "calls": "1", "call_ids": "1>61007"},
    )  # fmt: skip
    natt = Row(
        "udp", "10.77.0.14:4500", f"{PUB}:4500", "203.0.113.50:4500", "NATT", 100.0,
        detail={"natt": "ike+esp-in-udp", "spi_out": "0x1", "spi_in": "0x2"},
    )  # fmt: skip
    assert kind_of(pptp) == "pptp" and kind_of(natt) == "natt"
    out = lines_of(render_text([pptp], {}))
    assert out[0].split()[-4:] == ["CALL-IDS", "IN>OUT", "CONTROL", "DETAIL"]
    assert out[1].startswith("pptp ") and out[1].split()[-3:] == [
        "1>61007",
        "established",
        "calls=1",
    ]
    out = lines_of(render_text([natt], {}, proto="natt"))
    assert out[1].split()[-3:] == ["ike+esp-in-udp", "0x1", "0x2"]


def test_proto_filter_matches_helper_kind_and_ip_protocol() -> None:
    assert [r.inside for r in filter_rows(ROWS, proto="isakmp")] == ["10.77.0.12:500"]
    assert len(filter_rows(ROWS, proto="UDP")) == 2  # ISAKMP is UDP too
    assert filter_rows(ROWS, proto="ah") == []


def test_host_filter_matches_any_side_and_networks() -> None:
    assert {r.inside for r in filter_rows(ROWS, host="10.77.0.11")} == {
        "10.77.0.11:40001",
        "10.77.0.11 id=7",
        "10.77.0.11",
    }
    assert len(filter_rows(ROWS, host="203.0.113.50")) == 3
    assert len(filter_rows(ROWS, host="203.0.113.0/24")) == 7  # not the "*" forward
    assert len(filter_rows(ROWS, host=PUB)) == 8
    assert len(filter_rows(ROWS, host="10.77.0.12", proto="esp")) == 1
    with pytest.raises(ValueError, match="not an IPv4 address or network"):
        filter_rows(ROWS, host="not-an-ip")


def test_empty_table() -> None:
    assert render_text([], {}) == "0 entries\n"
    assert render_text(ROWS, {}, host="192.0.2.1") == "0 of 8 entries shown\n"


def test_json_is_filtered_and_strict() -> None:
    doc = json.loads(render_json(ROWS, COUNTERS, proto="tcp"))
    assert doc["total_entries"] == 8
    assert [e["inside"] for e in doc["entries"]] == ["10.77.0.5:1723", "10.77.0.11:40001"]
    assert doc["entries"][0]["expires_in"] is None  # permanent: null, not Infinity
    assert doc["counters"] == dict(sorted(COUNTERS.items()))


def test_wire_round_trip() -> None:
    wire = json.loads(json.dumps(rows_to_wire(ROWS), allow_nan=False))
    assert rows_from_wire(wire) == ROWS
    payload = status_payload(ROWS, COUNTERS)
    assert rows_from_wire(payload["entries"]) == ROWS and payload["counters"] == COUNTERS


def test_wire_ignores_unknown_fields_and_rejects_bad_ones() -> None:
    wire = rows_to_wire(ROWS[:1])
    wire[0]["added_later"] = 1
    assert rows_from_wire(wire) == ROWS[:1]
    del wire[0]["pkts_in"]
    with pytest.raises(ValueError, match=r"entries\[0\]\.pkts_in: missing"):
        rows_from_wire(wire)
    wire = rows_to_wire(ROWS[:1])
    wire[0]["pkts_in"] = "5"
    with pytest.raises(ValueError, match=r"entries\[0\]\.pkts_in"):
        rows_from_wire(wire)
    with pytest.raises(ValueError, match="expected a list"):
        rows_from_wire({"entries": []})


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.4, "0s"),
        (-3, "0s"),
        (59.9, "59s"),
        (60, "1m00s"),
        (425, "7m05s"),
        (7440, "2h04m"),
        (90000, "1d01h"),
        (math.inf, "never"),
    ],
)
def test_format_expires(seconds: float, text: str) -> None:
    assert format_expires(seconds) == text


@pytest.mark.parametrize(
    ("n", "text"), [(0, "0"), (1023, "1023"), (1536, "1.5K"), (150_000, "146K"), (5 << 30, "5.0G")]
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_kind_of_uses_explicit_kind_first() -> None:
    r = Row("tcp", "10.0.0.1:1", "x", "y", "s", 1.0, detail={"kind": "pptp", "call_inside": "3"})
    assert kind_of(r) == "pptp"
    assert kind_of(ROWS[5]) == "isakmp"
    assert kind_of(ROWS[0]) == "tcp"


def test_rich_table_has_all_rows_and_columns() -> None:
    table = rich_table(ROWS)
    assert table.row_count == len(ROWS)
    assert [c.header for c in table.columns][:3] == ["PROTO", "INSIDE", "OUTSIDE"]
    console = Console(width=250, record=True, color_system=None)
    console.print(table)
    text = console.export_text()
    assert "0xc0ffee01" in text and "10.77.0.13" in text
    assert rich_table([]).row_count == 0


def test_rich_table_never_cuts_identifiers_short() -> None:
    """A live display narrower than the table folds the other columns; cookies and SPIs
    stay whole on one line."""
    ike = Row("udp", "10.77.0.12:500", f"{PUB}:500", "203.0.113.50:500", "ESTABLISHED", 60.0,
              detail={"icookie": "1122334455667788", "rcookie": "99aabbccddeeff00",
                      "version": "1.0"})
    for width in (160, 100):
        console = Console(width=width, record=True)
        console.print(rich_table([ike]))
        text = console.export_text()
        assert "1122334455667788" in text and "99aabbccddeeff00" in text, text


def test_status_shows_the_replication_role_in_text_and_json() -> None:
    sync = {
        "role": "standby", "node": 2, "peer": "10.77.0.2:3790", "peer_seen_s_ago": 0.2,
        "replica_entries": 5, "replica_synced": True, "yielding": False, "tick_s": 0.2,
    }
    text = render_text([], {}, sync=sync)
    assert (
        "sync: node 2 standby, replica 5 entries (synced), peer 10.77.0.2:3790 heard 0.2 s ago"
        in text
    )
    active = {**sync, "role": "active", "node": 1, "peer_seen_s_ago": None, "yielding": False}
    assert "sync: node 1 active, sending every 0.2 s, peer 10.77.0.2:3790 never heard" in (
        render_text([], {}, sync=active)
    )
    assert json.loads(render_json([], {}, sync=sync))["sync"]["replica_synced"] is True
    assert "sync" not in json.loads(render_json([], {}))
