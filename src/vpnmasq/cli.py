"""The ``vpnmasq`` command: a thin click layer over config, control, status, replay and daemon.

Each command parses options (every one can also come from a ``VPNMASQ_*`` environment
variable), builds what the library needs and calls it. Heavy or optional modules (the
daemon, the engine via replay, the lab demo) are imported inside their command, so
``vpnmasq status`` stays quick and works on a build without the lab.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import click

from vpnmasq import __version__
from vpnmasq.config import (
    Config,
    ConfigError,
    ConfigErrors,
    explain,
    load_config,
    parse_value,
    read_config_text,
    validate,
)

DEFAULT_CONFIG = "/etc/vpnmasq/vpnmasq.toml"
DEFAULT_SOCKET = Config().control_socket
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _fail(message: str, code: int = 1) -> NoReturn:
    click.secho(f"vpnmasq: {message}", fg="red", err=True)
    sys.exit(code)


def _fail_for(message: str, as_json: bool) -> NoReturn:
    """Exit 1 with ``message``; with ``--json`` also as ``{"ok": false, "error": ...}`` on
    stdout, so a script reading stdout sees why."""
    if as_json:
        import json as _json

        click.echo(_json.dumps({"ok": False, "error": message}))
    _fail(message)


def _warn(message: str) -> None:
    click.secho(f"warning: {message}", fg="yellow", err=True)


def _config_errors(path: str, err: ConfigError) -> list[str]:
    errors = err.errors if isinstance(err, ConfigErrors) else [err]
    return [f"{path}: {e}" for e in errors]


def _load(path: str, exit_code: int = 1) -> tuple[Config, list[str]]:
    """Config and warnings, or exit ``exit_code`` printing every error with its key and line."""
    try:
        text = read_config_text(path)
        config = load_config(text)
        return config, validate(config, text)
    except ConfigError as e:
        for line in _config_errors(path, e):
            click.secho(line, fg="red", err=True)
        sys.exit(exit_code)


def _missing_module(err: ImportError, *names: str) -> bool:
    """True if ``err`` is about one of ``names`` itself, not something it imports."""
    return err.name in names


# scapy is an optional extra: only reading captures needs it, the gateway does not.
NO_SCAPY = (
    "reading capture files needs scapy, which is not installed: apt install python3-scapy "
    "(Debian), or pip install 'vpnmasq[pcap]'"
)


EPILOG = """\b
Examples:
  vpnmasq check-config /etc/vpnmasq/vpnmasq.toml
  vpnmasq check-config --explain            # every key, type, default, meaning
  vpnmasq run -c /etc/vpnmasq/vpnmasq.toml  # usually via systemd (vpnmasq.service)
  vpnmasq status --proto esp                # SPIs and how they were associated
  vpnmasq status --host 10.77.0.11 --json
  vpnmasq replay -c lab.toml lan.pcapng out.pcap && tshark -r out.pcap

Every option can also be set with the VPNMASQ_* variable shown in its help.
"""


@click.group(context_settings=CONTEXT, epilog=EPILOG)
@click.version_option(__version__, "-V", "--version", prog_name="vpnmasq")
def cli() -> None:
    """VPN-aware IP masquerading gateway for Linux.

    vpnmasq masquerades a private LAN behind one public address, like iptables MASQUERADE,
    and also handles the VPN protocols plain NAT breaks: IPsec (ISAKMP/IKE on UDP 500 kept
    on its port and told apart by cookies, ESP associated by SPI, NAT-T) and PPTP (TCP 1723
    control with Call ID translation, GRE data). Several LAN hosts can use VPNs to the same
    remote gateway at once, and LAN VPN servers can be published with [[forward]] rules.

    Packets reach vpnmasq through netfilter NFQUEUE; in hybrid mode the kernel keeps
    masquerading ordinary traffic and only VPN traffic is queued.
    """


# ------------------------------------------------------------------------------ run
@cli.command(context_settings=CONTEXT, short_help="Run the gateway (foreground; root).")
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=DEFAULT_CONFIG,
    show_default=True,
    envvar="VPNMASQ_CONFIG",
    help="Configuration file (TOML). [env: VPNMASQ_CONFIG]",
)
@click.option(
    "--handover",
    is_flag=True,
    envvar="VPNMASQ_HANDOVER",
    help="Be the successor of an instance stopped with SIGUSR2: keep its rules (swapped "
    "atomically, no gap), bind the queue once it is free (waits up to 10 s) and carry on "
    "with the table it saved (state_file, or handover.json next to the control socket), so "
    "VPN sessions survive an upgrade. [env: VPNMASQ_HANDOVER]",
)
def run(config_path: str, handover: bool) -> None:
    """Run the gateway in the foreground (needs root / CAP_NET_ADMIN).

    Installs the NFQUEUE rules for outside_interface (removing any a crashed run left) and
    masquerades packets until a signal:

    \b
    SIGTERM, SIGINT  stop: save the table to state_file (if set), remove the
                     rules, exit 0.
    SIGHUP           reload: re-read the configuration file and apply it with
                     the table kept (entries that no longer apply are removed
                     and logged); a broken file is refused, the running
                     configuration stays. systemctl reload vpnmasq sends it.
    SIGUSR2          hand over: save the table for a successor and exit 0,
                     leaving the rules in place (vpnmasq's packets are dropped,
                     never leaked, until the successor runs).

    \b
    Upgrade: kill -USR2 <pid>; wait for it to exit; vpnmasq run --handover
    With state_file set the table is also saved every 30 s and restored at start.

    A missing or down outside_interface is waited for (logged once); the rules are
    installed when it is up. Under systemd (Type=notify) READY=1 follows the rules and the
    queue, WATCHDOG=1 comes from the packet loop and STATUS= shows the mapping count.

    The configuration is checked first, as `check-config --offline` does; errors name the
    key and line and exit with status 2. Other failures (no CAP_NET_ADMIN, the queue in
    use) exit with status 1. Use the systemd unit in packaging/ for service operation.
    """
    config, warnings = _load(config_path, exit_code=2)
    for w in warnings:
        _warn(f"{config_path}: {w}")
    try:
        daemon = importlib.import_module("vpnmasq.daemon")
    except ImportError as e:
        if _missing_module(e, "vpnmasq.daemon"):
            _fail("this build has no daemon (vpnmasq.daemon is missing)")
        raise
    rc = daemon.run(config, handover=handover, config_path=config_path)
    sys.exit(rc if isinstance(rc, int) else 0)


# ------------------------------------------------------------------------------ check-config
@cli.command(
    "check-config",
    context_settings=CONTEXT,
    short_help="Check a config file; --explain lists keys.",
)
@click.argument("file", required=False, type=click.Path(dir_okay=False), envvar="VPNMASQ_CONFIG")
@click.option(
    "--explain",
    "show_explain",
    is_flag=True,
    envvar="VPNMASQ_EXPLAIN",
    help="Print every configuration key with its type, default and meaning. [env: VPNMASQ_EXPLAIN]",
)
@click.option(
    "--markdown",
    is_flag=True,
    envvar="VPNMASQ_MARKDOWN",
    help="With --explain: print the key reference as Markdown tables (as in the README). "
    "[env: VPNMASQ_MARKDOWN]",
)
@click.option(
    "--offline",
    is_flag=True,
    envvar="VPNMASQ_OFFLINE",
    help="Check only the file; do not look at this machine's interfaces and firewall. "
    "[env: VPNMASQ_OFFLINE]",
)
def check_config(file: str | None, show_explain: bool, markdown: bool, offline: bool) -> None:
    """Check a configuration FILE without starting anything.

    Prints OK and any warnings (values that work but are risky, e.g. timeouts below the
    RFC 4787/5382/5508 minimums), or every error with its key and line number and exits 1.
    outside_interface and inside_networks are required. Unless --offline, also checks this
    machine as `vpnmasq diagnose` does: that outside_interface exists and is up (run waits
    for it otherwise), and that a FORWARD chain that drops by default accepts vpnmasq's
    packet mark (reading the firewall needs root). FILE defaults to $VPNMASQ_CONFIG, then
    /etc/vpnmasq/vpnmasq.toml.
    """
    if show_explain:
        click.echo(explain("markdown" if markdown else "text"), nl=False)
        if file is None:
            return
        click.echo()
    if file is None:
        file = DEFAULT_CONFIG
    config, file_warnings = _load(file)
    warnings = [f"{file}: {w}" for w in file_warnings]
    if not offline:
        warnings += _host_warnings(config)
    for w in warnings:
        _warn(w)
    n = len(warnings)
    suffix = f" ({n} warning{'s' if n != 1 else ''})" if n else ""
    click.echo(f"OK: {file}{suffix}")


def _host_warnings(config: Config) -> list[str]:
    """diagnose's checks of the interface and the FORWARD chain; anything not OK warns."""
    from vpnmasq.tools import diagnose as dg

    facts = dg.gather_host(config)
    out = []
    if facts.iptables is None and facts.nft is None:
        why = "not running as root" if not facts.is_root else "iptables-save and nft failed"
        out.append(f"{why}: skipped the check of the FORWARD chain for vpnmasq's mark")
    for check in dg.CONFIG_CHECKS:
        for fd in check(facts):
            if fd.level >= dg.Level.WARN:
                out.append(fd.message + (f". Fix: {fd.fix}" if fd.fix else ""))
    return out


# ------------------------------------------------------------------------------ status / flush
def _config_option(f: Any) -> Any:
    return click.option(
        "-c",
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        default=None,
        envvar="VPNMASQ_CONFIG",
        help=f"Configuration file (default {DEFAULT_CONFIG} if it exists, else built-in "
        "defaults). [env: VPNMASQ_CONFIG]",
    )(f)


def _config_or_default(path: str | None) -> Config:
    if path is None:
        if not os.path.exists(DEFAULT_CONFIG):
            _warn(f"{DEFAULT_CONFIG} not found: checking against the default configuration")
            return Config()
        path = DEFAULT_CONFIG
    return _load(path)[0]


def _socket_option(f: Any) -> Any:
    return click.option(
        "-s",
        "--socket",
        "socket_path",
        type=click.Path(dir_okay=False),
        default=None,
        envvar="VPNMASQ_SOCKET",
        help="Control socket of the running daemon. Default: control_socket from the config "
        f"file ($VPNMASQ_CONFIG or {DEFAULT_CONFIG}) if it loads, else {DEFAULT_SOCKET}. "
        "[env: VPNMASQ_SOCKET]",
    )(f)


def _socket_path(explicit: str | None, config_path: str | None = None) -> str:
    """The control socket: ``--socket``, else the config's (``-c``, $VPNMASQ_CONFIG or the
    default file; an explicit ``-c`` that does not load is an error), else the default."""
    if explicit:
        return explicit
    if config_path is not None:
        return _load(config_path)[0].control_socket
    path = os.environ.get("VPNMASQ_CONFIG", DEFAULT_CONFIG)
    try:
        return load_config(read_config_text(path)).control_socket
    except ConfigError:
        return DEFAULT_SOCKET


def _query(
    path: str, cmd: str, params: dict[str, Any] | None = None, *, as_json: bool = False
) -> dict[str, Any]:
    """Ask the daemon; on failure exit 1 with the reason (see :func:`_fail_for`)."""
    from vpnmasq.datapath.control import ControlError, query

    try:
        return query(path, cmd, params=params)
    except ControlError as e:
        _fail_for(str(e), as_json)


def _check_host(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    from vpnmasq.status import parse_host

    try:
        parse_host(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return value


@cli.command(context_settings=CONTEXT, short_help="Show the live masquerade table.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    envvar="VPNMASQ_JSON",
    help="Print JSON (entries + counters) instead of a table. [env: VPNMASQ_JSON]",
)
@click.option(
    "-p",
    "--proto",
    metavar="PROTO",
    envvar="VPNMASQ_PROTO",
    help="Only entries of this protocol or helper: tcp, udp, icmp, esp, gre, isakmp, pptp... "
    "[env: VPNMASQ_PROTO]",
)
@click.option(
    "-H",
    "--host",
    metavar="ADDR[/LEN]",
    envvar="VPNMASQ_HOST",
    callback=_check_host,
    help="Only entries with this address or network on any side (inside, outside or "
    "remote). [env: VPNMASQ_HOST]",
)
@click.option(
    "-l",
    "--limit",
    type=click.IntRange(1, 1_000_000),
    default=None,
    envvar="VPNMASQ_LIMIT",
    help="Only the N most recently active entries (the daemon picks them). "
    "[env: VPNMASQ_LIMIT]",
)
@_config_option
@_socket_option
def status(
    as_json: bool,
    proto: str | None,
    host: str | None,
    limit: int | None,
    config_path: str | None,
    socket_path: str | None,
) -> None:
    """Show the running daemon's masquerade table, like conntrack -L.

    One line per mapping: protocol, inside endpoint, outside (public) endpoint, remote,
    state, time until it expires, packets and bytes out/in. VPN entries add their
    identifiers: ESP SPIs out/in and how they were associated, ISAKMP cookies, PPTP/GRE
    Call IDs on the inside and outside. Counters (drops by reason, ...) follow the table.
    The daemon applies --proto, --host and --limit itself and builds the answer between
    packet batches, so asking never stalls the traffic, whatever the table size.
    """
    from vpnmasq.status import StatusQuery, rows_from_wire
    from vpnmasq.tools.status import render_json, render_text

    q = StatusQuery(proto.strip().lower() if proto else None, host, limit)
    resp = _query(
        _socket_path(socket_path, config_path), "status", q.to_request(), as_json=as_json
    )
    try:
        rows = rows_from_wire(resp.get("entries", []))
    except ValueError as e:
        _fail(f"the daemon sent a malformed table: {e}")
    counters = resp.get("counters", {})
    total = resp.get("total_entries")
    lim = resp.get("limits")
    limits = lim.get("text", []) if isinstance(lim, dict) else []
    render = render_json if as_json else render_text
    sync = resp.get("sync")
    click.echo(
        render(rows, counters, proto=proto, host=host,
               total=total if isinstance(total, int) else None,
               sync=sync if isinstance(sync, dict) else None, limits=limits),
        nl=False,
    )


@cli.command(
    "sync-ready",
    context_settings=CONTEXT,
    short_help="Exit 0 when this gateway may take the addresses ([sync]).",
)
@_config_option
@_socket_option
def sync_ready(config_path: str | None, socket_path: str | None) -> None:
    """Exit 0 when the daemon runs with [sync] and is active, or is the standby with a
    complete copy of the peer's table; exit 1 otherwise (not running, no [sync], standby
    still waiting for the table). For keepalived's track_script (packaging/keepalived.conf):
    a gateway that comes back takes the addresses only once it has the table. Prints the
    status line about replication.
    """
    from vpnmasq.tools.status import sync_line

    resp = _query(_socket_path(socket_path, config_path), "status", {"limit": 1})
    sync = resp.get("sync")
    if not isinstance(sync, dict):
        click.echo("sync: not configured ([sync] peer is unset)")
        sys.exit(1)
    click.echo(sync_line(sync))
    sys.exit(0 if sync.get("role") == "active" or sync.get("replica_synced") else 1)


@cli.command(context_settings=CONTEXT, short_help="Follow entries, associations and drops live.")
@click.option("--json", "as_json", is_flag=True, envvar="VPNMASQ_JSON",
              help="One JSON object per line instead of text. [env: VPNMASQ_JSON]")
@click.option("-p", "--proto", metavar="PROTO", envvar="VPNMASQ_PROTO",
              help="Only events of this protocol or helper: tcp, udp, icmp, esp, gre, isakmp, "
              "pptp... [env: VPNMASQ_PROTO]")
@click.option("-H", "--host", metavar="ADDR[/LEN]", envvar="VPNMASQ_HOST", callback=_check_host,
              help="Only events involving this address or network. [env: VPNMASQ_HOST]")
@click.option("-n", "--count", type=click.IntRange(1), default=None, envvar="VPNMASQ_COUNT",
              help="Stop after this many events. [env: VPNMASQ_COUNT]")
@_config_option
@_socket_option
def events(
    as_json: bool,
    proto: str | None,
    host: str | None,
    count: int | None,
    config_path: str | None,
    socket_path: str | None,
) -> None:
    """Follow the running daemon's events, like conntrack -E: entries created, updated
    (state changes) and removed (with the reason: expired, fin-rst, flushed, replaced,
    address-changed, reload, or the helper's own such as call-disconnect), ESP
    associations made (and how: IKE signal, serialized, guess, forward) or refused, PPTP
    calls up and down, drops by reason (at most 5 per reason and second, then a count).

    The daemon never waits for this reader: if it falls behind, its events are dropped
    and a [LOST] line says how many. Ctrl-C stops.
    """
    from vpnmasq.datapath.control import ControlError, subscribe
    from vpnmasq.tools.events import follow

    params: dict[str, Any] = {}
    if proto:
        params["proto"] = proto.strip().lower()
    if host:
        params["host"] = host
    path = _socket_path(socket_path, config_path)
    try:
        n = follow(subscribe(path, params), lambda line: click.echo(line), as_json=as_json,
                   count=count)
    except ControlError as e:
        _fail_for(str(e), as_json)
    except KeyboardInterrupt:
        return
    if count is None or n < count:
        _fail(f"the daemon closed the event stream after {n} events (stopped?)")


@cli.command(context_settings=CONTEXT, short_help="Live view of the busiest sessions.")
@click.option("-p", "--proto", metavar="PROTO", envvar="VPNMASQ_PROTO",
              help="Only sessions of this protocol or helper. [env: VPNMASQ_PROTO]")
@click.option("-H", "--host", metavar="ADDR[/LEN]", envvar="VPNMASQ_HOST", callback=_check_host,
              help="Only sessions involving this address or network. [env: VPNMASQ_HOST]")
@click.option("--sort", type=click.Choice(["pkts", "bytes"]), default="pkts", show_default=True,
              envvar="VPNMASQ_SORT", help="Order by packet or byte rate. [env: VPNMASQ_SORT]")
@click.option("-d", "--delay", "interval", type=click.FloatRange(0.2), default=1.0,
              show_default=True, envvar="VPNMASQ_DELAY",
              help="Seconds between refreshes. [env: VPNMASQ_DELAY]")
@click.option("-n", "--iterations", type=click.IntRange(1), default=None,
              envvar="VPNMASQ_ITERATIONS",
              help="Stop after this many refreshes (default: Ctrl-C). [env: VPNMASQ_ITERATIONS]")
@_config_option
@_socket_option
def top(
    proto: str | None,
    host: str | None,
    sort: str,
    interval: float,
    iterations: int | None,
    config_path: str | None,
    socket_path: str | None,
) -> None:
    """Show the busiest sessions live, refreshed in place like top (Ctrl-C quits).

    Header: entries by kind, packets per second each way, drops per second, the kernel
    queue's health (packets waiting, packets the kernel dropped because vpnmasq fell
    behind) and the mean time to handle a batch. One line per session, busiest first:
    kind, inside host, remote, packets and bytes per second out/in, and the association
    or call state (ESP: state/how associated; PPTP: control state and calls). Fits 80
    columns; the daemon picks the most recently active sessions without stalling traffic.
    Exit status 1 when the last refresh did not reach the daemon (e.g. with -n in a script).
    """
    from rich.console import Console

    from vpnmasq.datapath.control import query
    from vpnmasq.status import StatusQuery
    from vpnmasq.tools.top import FETCH_LIMIT
    from vpnmasq.tools.top import run as run_top

    path = _socket_path(socket_path, config_path)
    q = StatusQuery(proto.strip().lower() if proto else None, host, FETCH_LIMIT)
    reached = [True]  # whether the last refresh reached the daemon

    def fetch() -> Any:
        reached[0] = False
        answer = query(path, "status", params=q.to_request())
        reached[0] = True
        return answer

    run_top(fetch, Console(), interval=interval, iterations=iterations, sort=sort)
    if not reached[0]:  # -n N in a script: the daemon did not answer the last one
        sys.exit(1)


@cli.command(context_settings=CONTEXT, short_help="Drop all masquerade entries.")
@_config_option
@_socket_option
def flush(config_path: str | None, socket_path: str | None) -> None:
    """Drop every masquerade entry in the running daemon.

    Active connections and VPN sessions through the gateway break and must be re-established
    (forward rules stay). Use it after changing the public address by hand or to clear a
    wrong ESP association.
    """
    resp = _query(_socket_path(socket_path, config_path), "flush")
    n = resp.get("flushed", 0)
    click.echo(f"flushed {n} entr{'y' if n == 1 else 'ies'}")


# ------------------------------------------------------------------------------ replay
@cli.command(context_settings=CONTEXT, short_help="Run a pcap through the engine, offline.")
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    required=True,
    envvar="VPNMASQ_CONFIG",
    help="Configuration file; inside_networks decide direction, public_address is required. "
    "[env: VPNMASQ_CONFIG]",
)
@click.option(
    "--public-address",
    metavar="ADDR",
    envvar="VPNMASQ_PUBLIC_ADDRESS",
    help="Use this public address instead of the config's. [env: VPNMASQ_PUBLIC_ADDRESS]",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    envvar="VPNMASQ_SEED",
    help="Seed for port and ID choices, so runs are repeatable. [env: VPNMASQ_SEED]",
)
@click.argument("in_pcap", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_pcap", type=click.Path(dir_okay=False, writable=True))
def replay(
    config_path: str, public_address: str | None, seed: int, in_pcap: str, out_pcap: str
) -> None:
    """Run the packets of IN_PCAP through the masquerading engine, offline.

    IN_PCAP (pcap or pcapng; Ethernet, Linux cooked SLL/SLL2 or raw IP) should hold what
    the gateway receives: LAN packets (source in inside_networks, treated as outbound) and
    replies arriving on the outside (treated as inbound). Each packet is handled at its
    capture timestamp, so timeouts behave as they would have live. What the gateway would
    forward is written to OUT_PCAP as raw IPv4 with the original timestamps; a summary
    with drops by reason and the final masquerade table is printed. Needs no root.
    """
    import dataclasses

    from rich.console import Console

    try:
        from vpnmasq.tools.replay import ReplayError, print_summary
        from vpnmasq.tools.replay import replay as do_replay
    except ImportError as e:
        if _missing_module(e, "scapy"):
            _fail(NO_SCAPY)
        raise

    config, warnings = _load(config_path)
    for w in warnings:
        _warn(f"{config_path}: {w}")
    if public_address is not None:
        try:
            config = dataclasses.replace(
                config, public_address=parse_value("public_address", public_address)
            )
            validate(config)
        except ConfigError as e:
            raise click.BadParameter(str(e), param_hint="--public-address") from None
    try:
        report = do_replay(config, in_pcap, out_pcap, seed=seed)
    except ReplayError as e:
        _fail(str(e))
    print_summary(report, out_pcap, Console(width=None if sys.stdout.isatty() else 160))


# ------------------------------------------------------------------------------ diagnose
@cli.command(context_settings=CONTEXT, short_help="Check this gateway; say what to fix.")
@_config_option
@click.option(
    "-H",
    "--host",
    metavar="ADDR",
    envvar="VPNMASQ_HOST",
    callback=_check_host,
    help="Also follow this LAN host's VPN traffic: where it was last seen and where it "
    "stopped. [env: VPNMASQ_HOST]",
)
@_socket_option
@click.option("--json", "as_json", is_flag=True, envvar="VPNMASQ_JSON",
              help="Print the findings as JSON. [env: VPNMASQ_JSON]")
@click.option("-q", "--quiet", is_flag=True, envvar="VPNMASQ_QUIET",
              help="Only problems and warnings, no OK lines. [env: VPNMASQ_QUIET]")
def diagnose(
    config_path: str | None, host: str | None, socket_path: str | None, as_json: bool, quiet: bool
) -> None:
    """Run the HOWTO's troubleshooting checklist on this machine, one line per finding.

    Checks that vpnmasq runs and its rules are in place, IPv4 forwarding, rp_filter, the
    kernel pieces it needs, your own masquerade or kernel PPTP helper rules competing with
    it, a FORWARD policy that drops its (untracked) packets, an outside address behind
    another NAT, the outside MTU, a VPN endpoint on the gateway itself, [[route]]s, and
    drop counters. With --host, follows that host's IKE/ESP/NAT-T/PPTP/GRE mappings and
    says where its traffic stopped ("GRE out, nothing back"). Exit 1 if anything FAILs.
    Run as root on the gateway.
    """
    from vpnmasq.tools import diagnose as dg

    config = _config_or_default(config_path)
    facts = dg.gather(config, host=host, socket_path=socket_path)
    findings = dg.run_checks(facts)
    click.echo(dg.render_json(findings) if as_json else dg.render(findings, verbose=not quiet),
               nl=False)
    sys.exit(dg.exit_code(findings))


# ------------------------------------------------------------------------------ trace
@cli.command(context_settings=CONTEXT, short_help="Capture VPN packets before/after NAT.")
@_config_option
@click.option("-H", "--host", metavar="ADDR[/LEN]", envvar="VPNMASQ_HOST", callback=_check_host,
              help="Only this LAN host (on the outside: the remotes it talks to). "
              "[env: VPNMASQ_HOST]")
@click.option("-p", "--proto", "protos", metavar="PROTO", multiple=True, envvar="VPNMASQ_PROTO",
              help="Only these (repeatable): gre, esp, ah, isakmp, natt, ike, pptp, ipsec, "
              "l2tp, vpn, tcp, udp, icmp. Default: everything. ICMP errors always show. "
              "[env: VPNMASQ_PROTO]")
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False, writable=True),
              envvar="VPNMASQ_TRACE_OUT", help="Write a pcapng here (open it in Wireshark). "
              "[env: VPNMASQ_TRACE_OUT]")
@click.option("-d", "--duration", type=float, default=None, envvar="VPNMASQ_DURATION",
              help="Stop after this many seconds (default: Ctrl-C). [env: VPNMASQ_DURATION]")
@click.option("-n", "--count", type=int, default=None, envvar="VPNMASQ_COUNT",
              help="Stop after this many packets. [env: VPNMASQ_COUNT]")
@click.option("-i", "--inside-if", "inside_ifs", multiple=True, envvar="VPNMASQ_INSIDE_IF",
              help="LAN interface(s); default: those with an address in inside_networks. "
              "[env: VPNMASQ_INSIDE_IF]")
@click.option("--lines-per-second", type=float, default=5.0, show_default=True,
              envvar="VPNMASQ_LINES_PER_SECOND",
              help="Decoded lines per flow and second (0: all); the pcapng has every packet. "
              "[env: VPNMASQ_LINES_PER_SECOND]")
@click.option("-r", "--read", "read_path", type=click.Path(exists=True, dir_okay=False),
              envvar="VPNMASQ_TRACE_READ",
              help="Decode an existing pcap/pcapng (e.g. from tcpdump) instead of capturing. "
              "[env: VPNMASQ_TRACE_READ]")
def trace(  # long: a click command: its options and their help are most of it
    config_path: str | None,
    host: str | None,
    protos: tuple[str, ...],
    out_path: str | None,
    duration: float | None,
    count: int | None,
    inside_ifs: tuple[str, ...],
    lines_per_second: float,
    read_path: str | None,
) -> None:
    """Capture matching packets on the LAN and outside interfaces, before and after
    translation, and print one decoded line per packet (GRE flags/Call ID/seq/ack, ESP
    SPI/seq, ISAKMP cookies, exchange and message id, NAT-T, PPTP messages, ICMP errors).

    The two copies of a datagram are paired (the line ends with "(= #N)"), so a packet
    that left and got no answer, or arrived and was not forwarded, stands out. With --out,
    every matching packet also goes to a pcapng (interface names, a comment per packet).
    Needs root (AF_PACKET sockets); works whether or not the daemon runs.
    """
    import json as _json
    import signal
    import subprocess

    from vpnmasq.tools import trace as tr

    try:
        match = tr.proto_matcher(protos)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--proto") from None
    if read_path is not None:
        try:
            from vpnmasq.tools.replay import ReplayError

            tr.decode_file(read_path, click.echo, match=match, host=host, count=count)
        except ImportError as e:
            if _missing_module(e, "scapy"):
                _fail(NO_SCAPY)
            raise
        except ReplayError as e:
            _fail(str(e))
        return
    if os.geteuid() != 0:
        _fail("vpnmasq trace needs root (packet sockets on the gateway's interfaces)")
    config = _config_or_default(config_path)
    try:
        links = _json.loads(
            subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True,
                           timeout=10).stdout or "[]"
        )
    except (OSError, ValueError, subprocess.TimeoutExpired) as e:
        _fail(f"cannot list interfaces: {e}")
    inside = list(inside_ifs) or tr.inside_interfaces(config.inside_networks, links)
    public = config.public_address
    if public is None:
        for link in links:
            if link.get("ifname") == config.outside_interface:
                addrs = [a["local"] for a in link.get("addr_info", []) if a.get("family") == "inet"]
                public = addrs[0] if addrs else None
    ifaces = {name: "inside" for name in inside}
    ifaces[config.outside_interface] = "outside"
    tracer = tr.Tracer(config.inside_networks, public=public, host=host, match=match)
    stopping = False

    def _stop(*_a: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    click.echo(f"tracing on {', '.join(ifaces)} (public {public or 'unknown'}); Ctrl-C stops",
               err=True)
    out = open(out_path, "wb") if out_path else None  # noqa: SIM115
    try:
        writer = tr.PcapngWriter(out) if out is not None else None
        try:
            n = tr.capture_live(
                ifaces, tracer, writer, lambda line: click.echo(line),
                duration=duration, count=count,
                limiter=tr.LineLimiter(lines_per_second), stop=lambda: stopping,
            )
        except OSError as e:
            _fail(f"capture failed: {e}")
    finally:
        if out is not None:
            out.close()
    click.echo(f"{n} packets" + (f" written to {out_path}" if out_path else ""), err=True)


# ------------------------------------------------------------------------------ demo
@cli.command(
    context_settings={**CONTEXT, "ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
    short_help="Lab demo in network namespaces (root).",
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def demo(args: Sequence[str]) -> None:
    """Run the lab demo: LAN hosts, the gateway and VPN servers in network namespaces.

    Several LAN hosts bring up IPsec and PPTP tunnels to the same remote servers through
    vpnmasq while the masquerade table updates live. Needs root. Arguments are passed to
    the demo; run `vpnmasq demo --help` for its options.
    """
    try:
        lab_demo = importlib.import_module("vpnmasq_lab.demo")
    except ImportError as e:
        if _missing_module(e, "vpnmasq_lab.demo", "vpnmasq_lab"):
            _fail("the lab demo is not installed: it is the separate vpnmasq-lab package (pip install ./lab from a clone; `make demo` does it)")
        raise
    rc = lab_demo.main(list(args))
    sys.exit(rc if isinstance(rc, int) else 0)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="vpnmasq")


if __name__ == "__main__":  # pragma: no cover
    main()
