"""``vpnmasq top`` off-line: rates between two answers, order by rate, the header's totals and
queue health, and a screen that fits 80 columns."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from vpnmasq.events import Row
from vpnmasq.status import rows_to_wire
from vpnmasq.tools.top import Sampler, render, run

PUB = "198.51.100.1"


def esp(pkts: int, bytes_: int) -> Row:
    return Row("esp", "10.77.0.11", PUB, "203.0.113.50", "ESTABLISHED", 900.0, pkts, pkts,
               bytes_, bytes_, {"spi_out": "0xc0ffee01", "spi_in": "0x0badf00d",
                                "assoc": "established", "how": "ike-signal"})


def udp(port: int, pkts: int) -> Row:
    return Row("udp", f"10.77.0.12:{port}", f"{PUB}:{port}", "203.0.113.9:53", "napt", 200.0,
               pkts, pkts // 2, pkts * 100, pkts * 50)


def answer(rows: list[Row], **counters: int) -> dict[str, Any]:
    return {"entries": rows_to_wire(rows), "total_entries": 20001, "counters": counters}


def test_rates_come_from_two_answers_and_the_busiest_leads() -> None:
    s = Sampler()
    first = s.update(answer([esp(100, 10_000), udp(5000, 10)], packets_out=1000), 10.0)
    assert all(x.pps_out == 0 for x in first.sessions)  # no interval yet
    f = s.update(
        answer([esp(300, 30_000), udp(5000, 20), udp(5001, 40)], packets_out=3000,
               packets_in=500, dropped=4, kernel_queue_dropped=7, queue_batches=110,
               queue_latency_us_total=55_000, kernel_queue_waiting=3),
        12.0,
    )
    assert [x.kind for x in f.sessions] == ["esp", "udp", "udp"]
    lead = f.sessions[0]
    assert (lead.pps_out, lead.pps_in, lead.bps_out) == (100.0, 100.0, 10_000.0)
    assert lead.state == "by ike-signal"
    # a session new since the last answer counts from zero
    assert [x.inside for x in f.sessions[1:]] == ["10.77.0.12:5001", "10.77.0.12:5000"]
    assert f.sessions[1].pps_out == 20.0
    assert f.pps_out == 1000.0 and f.pps_in == 250.0 and f.drops_ps == 2.0
    assert f.kernel_drops == 7 and f.queue_waiting == 3
    assert f.batch_ms == 0.5  # 55 ms over 110 batches


def test_the_header_counts_what_the_kernel_forwarded_through_the_offload_maps() -> None:
    """With offload, most packets never reach the engine: the header's rates add what the
    daemon read back from the maps, as the session lines do."""
    s = Sampler()
    s.update(answer([], packets_out=100, offload_packets_out=1000, offload_packets_in=0), 0.0)
    f = s.update(answer([], packets_out=300, packets_in=10, offload_packets_out=21_000,
                        offload_packets_in=4000), 2.0)
    assert (f.pps_out, f.pps_in) == (10_100.0, 2005.0)


def test_batch_time_and_kernel_drop_rate() -> None:
    s = Sampler()
    s.update(answer([], queue_batches=100, queue_latency_us_total=50_000,
                    kernel_queue_dropped=1), 0.0)
    f = s.update(answer([], queue_batches=300, queue_latency_us_total=150_000,
                        kernel_queue_dropped=11), 2.0)
    assert f.batch_ms == 0.5 and f.kernel_drops_ps == 5.0


def test_sort_by_bytes() -> None:
    s = Sampler("bytes")
    s.update(answer([esp(0, 0), udp(5000, 0)]), 0.0)
    f = s.update(answer([esp(1, 100_000), udp(5000, 50)]), 1.0)
    assert [x.kind for x in f.sessions] == ["esp", "udp"]


def test_screen_fits_80_columns_with_header_and_sessions() -> None:
    s = Sampler()
    rows = [esp(0, 0)] + [udp(40000 + i, 0) for i in range(40)]
    s.update(answer(rows), 0.0)
    f = s.update(answer([esp(500, 600_000)] + [udp(40000 + i, i) for i in range(40)],
                        packets_out=9000, **{"entries:napt": 19999, "entries:esp": 2}), 1.0)
    console = Console(width=80, record=True, force_terminal=False)
    console.print(render(f, height=24))
    text = console.export_text()
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert len(lines) <= 24
    assert lines[0] == "vpnmasq top  20001 entries: napt 19999 esp 2"
    assert lines[1].startswith("pkt/s out 9.0k in 0  drops/s 0  queue 0 waiting, kernel drops 0")
    head = next(i for i, line in enumerate(lines) if line.startswith("KIND"))
    assert lines[head + 1].startswith("esp") and "10.77.0.11" in lines[head + 1]
    assert "203.0.113.50" in lines[head + 1] and "by ike-signal" in lines[head + 1]
    assert "10.77.0.12:40039" in lines[head + 2]  # the busiest UDP session next


def test_run_refreshes_and_reports_a_lost_daemon() -> None:
    answers: list[Any] = [answer([udp(1, 1)]), answer([udp(1, 3)]),
                          RuntimeError("vpnmasq is not running")]

    def fetch() -> Any:
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    console = Console(width=80, record=True, force_terminal=False)
    t = iter([0.0, 1.0, 2.0])
    n = run(fetch, console, iterations=3, clock=lambda: next(t), sleep=lambda _s: None)
    assert n == 3
    text = console.export_text()
    assert "vpnmasq is not running" in text
    assert "10.77.0.12:1" in text  # the last sessions stay on screen
    assert text.endswith("\n")  # not a terminal (a pipe, a file): whole lines
