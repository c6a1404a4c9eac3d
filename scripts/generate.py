#!/usr/bin/env python3
"""Generate the files the packages ship from the code itself, so they cannot drift from it.

    python3 scripts/generate.py OUTDIR

writes OUTDIR/vpnmasq.8 (from the click commands: their help, options and environment
variables), OUTDIR/vpnmasq.toml.5 (from ``vpnmasq check-config --explain``) and
OUTDIR/bash-completion/vpnmasq (click's completion script). Run with the package importable
(PYTHONPATH=src, or an installed vpnmasq). The man page date comes from SOURCE_DATE_EPOCH
(set by dpkg-buildpackage from debian/changelog) so builds are reproducible.
"""

from __future__ import annotations

import datetime
import inspect
import os
import re
import sys
from pathlib import Path

import click
from click.shell_completion import BashComplete

from vpnmasq import __version__
from vpnmasq.cli import DEFAULT_CONFIG, EPILOG, cli
from vpnmasq.config import Config, explain

NAME = "vpnmasq"
FILES = (
    (DEFAULT_CONFIG, "The configuration; see vpnmasq.toml(5)."),
    ("/etc/vpnmasq/guard.nft", "Optional nftables leak guard (drops LAN-sourced packets on the "
     "outside interface while nothing masquerades them); not loaded by vpnmasq itself."),
    (Config().control_socket, "Control socket of the running daemon (status, flush)."),
    ("/var/lib/vpnmasq/", "state_file lives here when the systemd unit runs vpnmasq."),
    ("/lib/systemd/system/vpnmasq.service", "The systemd unit."),
)


def esc(text: str) -> str:
    """Roff-escape running text: backslashes, and a leading dot or quote on a line."""
    text = text.replace("\\", "\\e")
    return re.sub(r"^([.'])", r"\\&\1", text, flags=re.M)


def opt(text: str) -> str:
    """An option or command name in bold, with real minus signs."""
    return "\\fB" + esc(text).replace("-", "\\-") + "\\fR"


def paragraphs(help_text: str) -> list[str]:
    """click help: paragraphs split by blank lines; a paragraph marked with \\b keeps its lines."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", inspect.cleandoc(help_text)):
        if para.startswith("\b"):
            body = esc(para[1:].strip("\n"))
            out.append(".PP\n.nf\n" + body + "\n.fi")
        else:
            out.append(".PP\n" + esc(" ".join(para.split())))
    return out


def options(ctx: click.Context, cmd: click.Command) -> list[str]:
    out: list[str] = []
    for param in cmd.get_params(ctx):
        if isinstance(param, click.Argument):
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record
        head = ", ".join(
            opt(n.split(" ", 1)[0]) + (" \\fI" + esc(n.split(" ", 1)[1]) + "\\fR" if " " in n else "")
            for n in names.split(", ")
        )
        out.append(".TP\n" + head + "\n" + esc(" ".join(help_text.split())))
    return out


def envvars(cmd: click.Command) -> set[str]:
    names: set[str] = set()
    for param in cmd.params:
        env = getattr(param, "envvar", None)
        if isinstance(env, str):
            names.add(env)
    for sub in getattr(cmd, "commands", {}).values():
        names |= envvars(sub)
    return names


def th(title: str, section: int, manual: str) -> str:
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0")) or None
    when = datetime.datetime.fromtimestamp(epoch, datetime.UTC) if epoch else None
    date = when.strftime("%Y-%m-%d") if when else ""
    return f'.TH {title} {section} "{date}" "{NAME} {__version__}" "{manual}"'


def manpage_8() -> str:
    root = click.Context(cli, info_name=NAME, **cli.context_settings)
    out = [
        th("VPNMASQ", 8, "System Administration"),
        ".SH NAME",
        f"{NAME} \\- VPN-aware IP masquerading gateway for Linux",
        ".SH SYNOPSIS",
        f".B {NAME}",
        "[\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
        ".SH DESCRIPTION",
        *paragraphs(cli.help or ""),
        ".SH OPTIONS",
        *options(root, cli),
        ".SH COMMANDS",
    ]
    assert isinstance(cli, click.Group)
    for name, cmd in cli.commands.items():
        ctx = click.Context(cmd, info_name=name, parent=root, **cmd.context_settings)
        usage = " ".join(cmd.collect_usage_pieces(ctx))
        out.append(f'.SS "{NAME} {name} {esc(usage)}"')
        out += paragraphs(cmd.help or "")
        out += options(ctx, cmd)
    out += [".SH ENVIRONMENT", ".PP", "Every option can also be set with an environment "
            "variable, named in its description:"]
    out += [".PP\n.nf\n" + "\n".join(sorted(envvars(cli))) + "\n.fi"]
    out += [".SH FILES"]
    out += [f".TP\n.I {path}\n{esc(what)}" for path, what in FILES]
    out += [".SH EXAMPLES", *paragraphs(EPILOG.replace("Examples:\n", ""))]
    out += [".SH SEE ALSO", ".BR vpnmasq.toml (5),", ".BR nft (8),", ".BR iptables (8),",
            ".BR systemd.service (5)"]
    return "\n".join(out) + "\n"


def manpage_5() -> str:
    """``check-config --explain``: a preamble, then per section a title, dashes and entries
    ``key  (type; default)`` followed by their indented meaning."""
    lines = explain("text").splitlines()
    out = [
        th("VPNMASQ.TOML", 5, "File Formats"),
        ".SH NAME",
        "vpnmasq.toml \\- configuration file of vpnmasq(8)",
        ".SH SYNOPSIS",
        f".I {DEFAULT_CONFIG}",
        ".SH DESCRIPTION",
    ]
    i = 0
    intro: list[str] = []
    while i < len(lines) and not (i + 1 < len(lines) and set(lines[i + 1]) == {"-"}):
        intro.append(lines[i])
        i += 1
    out += paragraphs("\n".join(intro))
    out.append(".PP\nCheck a file with \\fBvpnmasq check\\-config\\fR; the same reference is "
               "printed by \\fBvpnmasq check\\-config \\-\\-explain\\fR.")
    out.append(".SH KEYS")
    while i < len(lines):
        line = lines[i]
        if i + 1 < len(lines) and lines[i + 1] and set(lines[i + 1]) == {"-"}:
            out.append(f'.SS "{esc(line)}"')
            i += 2
            continue
        if line and not line.startswith(" "):
            key, _, rest = line.partition("  ")
            doc: list[str] = []
            i += 1
            while i < len(lines) and lines[i].startswith("    "):
                doc.append(lines[i].strip())
                i += 1
            out.append(f".TP\n{opt(key)} {esc(rest)}\n{esc(' '.join(doc))}")
            continue
        i += 1
    out += [".SH SEE ALSO", ".BR vpnmasq (8)"]
    return "\n".join(out) + "\n"


def bash_completion() -> str:
    return BashComplete(cli, {}, NAME, "_VPNMASQ_COMPLETE").source()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "vpnmasq.8").write_text(manpage_8())
    (out / "vpnmasq.toml.5").write_text(manpage_5())
    (out / "bash-completion").mkdir(exist_ok=True)
    (out / "bash-completion" / NAME).write_text(bash_completion())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
