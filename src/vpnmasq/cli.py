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
    read_config_text,
    validate,
)

DEFAULT_CONFIG = "/etc/vpnmasq/vpnmasq.toml"
DEFAULT_SOCKET = Config().control_socket
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _fail(message: str, code: int = 1) -> NoReturn:
    click.secho(f"vpnmasq: {message}", fg="red", err=True)
    sys.exit(code)


def _warn(message: str) -> None:
    click.secho(f"warning: {message}", fg="yellow", err=True)


def _config_errors(path: str, err: ConfigError) -> list[str]:
    errors = err.errors if isinstance(err, ConfigErrors) else [err]
    return [f"{path}: {e}" for e in errors]


def _load(path: str) -> tuple[Config, list[str]]:
    """Config and warnings, or exit 1 printing every error with its key and line."""
    try:
        text = read_config_text(path)
        config = load_config(text)
        return config, validate(config, text)
    except ConfigError as e:
        for line in _config_errors(path, e):
            click.secho(line, fg="red", err=True)
        sys.exit(1)


def _missing_module(err: ImportError, *names: str) -> bool:
    """True if ``err`` is about one of ``names`` itself, not something it imports."""
    return err.name in names


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
    help="Take over from a running or just-stopped instance: load the masquerade table "
    "saved in state_file, so VPN sessions survive a restart or upgrade. [env: VPNMASQ_HANDOVER]",
)
def run(config_path: str, handover: bool) -> None:
    """Run the gateway in the foreground (needs root / CAP_NET_ADMIN).

    Installs the NFQUEUE rules for outside_interface, masquerades packets until SIGTERM or
    SIGINT, then removes the rules again. Use the systemd unit in packaging/ for service
    operation. The configuration is checked first, as `check-config --offline` does.
    """
    config, warnings = _load(config_path)
    for w in warnings:
        _warn(f"{config_path}: {w}")
    try:
        daemon = importlib.import_module("vpnmasq.daemon")
    except ImportError as e:
        if _missing_module(e, "vpnmasq.daemon"):
            _fail("this build has no daemon (vpnmasq.daemon is missing)")
        raise
    rc = daemon.run(config, handover=handover)
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
    help="Check only the file; do not look at this machine's firewall. [env: VPNMASQ_OFFLINE]",
)
def check_config(file: str | None, show_explain: bool, markdown: bool, offline: bool) -> None:
    """Check a configuration FILE without starting anything.

    Prints OK and any warnings (values that work but are risky, e.g. timeouts below the
    RFC 4787/5382/5508 minimums), or every error with its key and line number and exits 1.
    Unless --offline, also checks that the FORWARD chain accepts vpnmasq's packet mark
    (needs root to read the ruleset). FILE defaults to $VPNMASQ_CONFIG.
    """
    if show_explain:
        click.echo(explain("markdown" if markdown else "text"), nl=False)
        if file is None:
            return
        click.echo()
    if file is None:
        raise click.UsageError("missing FILE (or use --explain)")
    config, file_warnings = _load(file)
    warnings = [f"{file}: {w}" for w in file_warnings]
    if not offline:
        warnings += _firewall_warnings(config)
    for w in warnings:
        _warn(w)
    n = len(warnings)
    suffix = f" ({n} warning{'s' if n != 1 else ''})" if n else ""
    click.echo(f"OK: {file}{suffix}")


def _firewall_warnings(config: Config) -> list[str]:
    """Warn when no FORWARD rule accepts the mark (skipped if rules/iptables are absent)."""
    try:
        rules = importlib.import_module("vpnmasq.datapath.rules")
    except ImportError as e:
        if _missing_module(e, "vpnmasq.datapath.rules", "vpnmasq.datapath"):
            return []
        raise
    if os.geteuid() != 0:
        return ["not running as root: skipped the check for the FORWARD mark rule"]
    try:
        present = rules.forward_mark_rule_present(config.mark)
    except (OSError, RuntimeError) as e:
        return [f"could not check the FORWARD chain for the mark rule: {e}"]
    if present:
        return []
    hint_fn = getattr(rules, "forward_mark_hint", None)
    hint = hint_fn(config.mark) if hint_fn else f"accept mark {config.mark:#x} in FORWARD"
    return [
        f"no FORWARD rule accepts packets with mark {config.mark:#x}; if the FORWARD chain "
        f"drops by default, vpnmasq's untracked packets will be dropped. Add: {hint}"
    ]


# ------------------------------------------------------------------------------ status / flush
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


def _socket_path(explicit: str | None) -> str:
    if explicit:
        return explicit
    path = os.environ.get("VPNMASQ_CONFIG", DEFAULT_CONFIG)
    try:
        return load_config(read_config_text(path)).control_socket
    except ConfigError:
        return DEFAULT_SOCKET


def _query(path: str, cmd: str) -> dict[str, Any]:
    from vpnmasq.datapath.control import ControlError, query

    try:
        return query(path, cmd)
    except ControlError as e:
        _fail(str(e))


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
@_socket_option
def status(as_json: bool, proto: str | None, host: str | None, socket_path: str | None) -> None:
    """Show the running daemon's masquerade table, like conntrack -L.

    One line per mapping: protocol, inside endpoint, outside (public) endpoint, remote,
    state, time until it expires, packets and bytes out/in. VPN entries add their
    identifiers: ESP SPIs out/in and how they were associated, ISAKMP cookies, PPTP/GRE
    Call IDs on the inside and outside. Counters (drops by reason, ...) follow the table.
    """
    from vpnmasq.status import render_json, render_text, rows_from_wire

    resp = _query(_socket_path(socket_path), "status")
    try:
        rows = rows_from_wire(resp.get("entries", []))
    except ValueError as e:
        _fail(f"the daemon sent a malformed table: {e}")
    counters = resp.get("counters", {})
    render = render_json if as_json else render_text
    click.echo(render(rows, counters, proto=proto, host=host), nl=False)


@cli.command(context_settings=CONTEXT, short_help="Drop all masquerade entries.")
@_socket_option
def flush(socket_path: str | None) -> None:
    """Drop every masquerade entry in the running daemon.

    Active connections and VPN sessions through the gateway break and must be re-established
    (forward rules stay). Use it after changing the public address by hand or to clear a
    wrong ESP association.
    """
    resp = _query(_socket_path(socket_path), "flush")
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

    from vpnmasq.replay import ReplayError, print_summary
    from vpnmasq.replay import replay as do_replay

    config, warnings = _load(config_path)
    for w in warnings:
        _warn(f"{config_path}: {w}")
    if public_address is not None:
        text = f'public_address = "{public_address}"\n'
        try:
            load_config(text)
            config = dataclasses.replace(config, public_address=public_address)
            validate(config)
        except ConfigError as e:
            raise click.BadParameter(str(e), param_hint="--public-address") from None
    try:
        report = do_replay(config, in_pcap, out_pcap, seed=seed)
    except ReplayError as e:
        _fail(str(e))
    print_summary(report, out_pcap, Console(width=None if sys.stdout.isatty() else 160))


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
        lab_demo = importlib.import_module("vpnmasq.lab.demo")
    except ImportError as e:
        if _missing_module(e, "vpnmasq.lab.demo", "vpnmasq.lab"):
            _fail("the lab demo is not part of this build (vpnmasq.lab.demo is missing)")
        raise
    rc = lab_demo.main(list(args))
    sys.exit(rc if isinstance(rc, int) else 0)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="vpnmasq")


if __name__ == "__main__":  # pragma: no cover
    main()
