"""Where in the TOML text a key is: line numbers tomllib does not report, so every error
and warning names its line; tomllib's own syntax errors moved back to the line that broke.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass

from vpnmasq.config.schema import ConfigError, ConfigErrors


# ----------------------------------------------------------------------------- line numbers
class Locator:
    """Line numbers of keys in TOML text, which tomllib does not report.

    Keys are dotted paths with 1-based indexes for array elements and ``[[tables]]``:
    ``"timeouts.udp"``, ``"forward[2].port"``, ``"inside_networks[3]"``. ``line(key)`` falls
    back to the nearest enclosing key (a missing ``forward[2].to`` points at its
    ``[[forward]]`` header). The scanner only needs to be right for text tomllib accepted;
    if it gets lost it stops, and messages simply carry fewer line numbers.
    """

    def __init__(self, text: str = "") -> None:
        self.lines: dict[str, int] = {}
        self.first_header: int | None = None  # line of the first [table] or [[table]]
        self._s = text
        self._i = 0
        self._line = 1
        self._arrays: dict[str, int] = {}  # [[name]] (unindexed) -> elements so far
        try:
            self._document()
        except (_ScanLost, IndexError):
            pass

    def line(self, key: str) -> int | None:
        k = key
        while k:
            if k in self.lines:
                return self.lines[k]
            cut = max(k.rfind("."), k.rfind("["))
            if cut <= 0:
                return None
            k = k[:cut]
        return None

    def has(self, key: str) -> bool:
        return key in self.lines

    # -- scanner ------------------------------------------------------------------------
    def _record(self, key: str, line: int) -> None:
        self.lines.setdefault(key, line)

    def _peek(self, k: int = 0) -> str:
        j = self._i + k
        return self._s[j] if j < len(self._s) else ""

    def _blank(self, newlines: bool) -> None:
        """Skip spaces and comments (and newlines if asked)."""
        s = self._s
        while self._i < len(s):
            c = s[self._i]
            if c in " \t\r":
                self._i += 1
            elif c == "#":
                while self._i < len(s) and s[self._i] != "\n":
                    self._i += 1
            elif c == "\n" and newlines:
                self._line += 1
                self._i += 1
            else:
                return

    def _document(self) -> None:
        table = ""
        while True:
            self._blank(newlines=True)
            if self._i >= len(self._s):
                return
            line = self._line
            if self._peek() == "[":
                if self.first_header is None:
                    self.first_header = line
                array = self._peek(1) == "["
                self._i += 2 if array else 1
                parts = self._key()
                self._blank(newlines=False)
                if not self._s.startswith("]]" if array else "]", self._i):
                    raise _ScanLost
                self._i += 2 if array else 1
                table = self._resolve(parts)
                if array:
                    plain = ".".join(parts)
                    self._arrays[plain] = self._arrays.get(plain, 0) + 1
                    self._record(table, line)
                    table = f"{table}[{self._arrays[plain]}]"
                self._record(table, line)
            else:
                self._pair(table)

    def _resolve(self, parts: list[str]) -> str:
        """Header parts -> path, indexing parents that are arrays of tables."""
        path = ""
        plain = ""
        for p in parts:
            plain = f"{plain}.{p}" if plain else p
            path = f"{path}.{p}" if path else p
            if plain in self._arrays and plain != ".".join(parts):
                path = f"{path}[{self._arrays[plain]}]"
        return path

    def _pair(self, table: str) -> None:
        line = self._line
        parts = self._key()
        path = table
        for p in parts:
            path = f"{path}.{p}" if path else p
            self._record(path, line)
        self._blank(newlines=False)
        if self._peek() != "=":
            raise _ScanLost
        self._i += 1
        self._blank(newlines=False)
        self._value(path)

    def _key(self) -> list[str]:
        parts: list[str] = []
        s = self._s
        while True:
            self._blank(newlines=False)
            c = self._peek()
            if c == '"':
                end = self._i + 1
                while s[end] != '"':
                    end += 2 if s[end] == "\\" else 1
                parts.append(json.loads(s[self._i : end + 1]))
                self._i = end + 1
            elif c == "'":
                end = s.index("'", self._i + 1)
                parts.append(s[self._i + 1 : end])
                self._i = end + 1
            else:
                start = self._i
                while self._i < len(s) and (s[self._i].isalnum() or s[self._i] in "_-"):
                    self._i += 1
                if self._i == start:
                    raise _ScanLost
                parts.append(s[start : self._i])
            self._blank(newlines=False)
            if self._peek() != ".":
                return parts
            self._i += 1

    def _value(self, path: str) -> None:  # noqa: C901 - one branch per value type of the schema
        s = self._s
        c = self._peek()
        if s.startswith('"""', self._i) or s.startswith("'''", self._i):
            q = s[self._i : self._i + 3]
            end = self._i + 3
            while not s.startswith(q, end):
                if s[end] == "\\" and q == '"""':
                    end += 1
                end += 1
                if end >= len(s):
                    raise _ScanLost
            while end + 3 < len(s) and s[end + 3] == q[0]:  # up to two quotes before closing
                end += 1
            self._line += s.count("\n", self._i, end)
            self._i = end + 3
        elif c == '"':
            end = self._i + 1
            while s[end] != '"':
                end += 2 if s[end] == "\\" else 1
            self._i = end + 1
        elif c == "'":
            self._i = s.index("'", self._i + 1) + 1
        elif c == "[":
            self._i += 1
            n = 0
            while True:
                self._blank(newlines=True)
                if self._peek() == "]":
                    self._i += 1
                    return
                n += 1
                self._record(f"{path}[{n}]", self._line)
                self._value(f"{path}[{n}]")
                self._blank(newlines=True)
                if self._peek() == ",":
                    self._i += 1
        elif c == "{":  # newlines tolerated (TOML 1.1 allows them; costs nothing here)
            self._i += 1
            while True:
                self._blank(newlines=True)
                if self._peek() == "}":
                    self._i += 1
                    return
                self._pair(path)
                self._blank(newlines=True)
                if self._peek() == ",":
                    self._i += 1
        else:
            start = self._i
            while self._i < len(s) and s[self._i] not in ",]}\n#":
                self._i += 1
            if self._i == start:
                raise _ScanLost


class _ScanLost(Exception):
    """The line scanner met something it does not understand; it stops quietly."""


# ----------------------------------------------------------------------------- errors
class Problems:
    """Collects errors or warnings with their key and line; raises them sorted by line."""

    def __init__(self, where: Locator) -> None:
        self.where = where
        self.items: list[ConfigError] = []

    def add(self, key: str, message: str) -> None:
        self.items.append(ConfigError(message, key=key, line=self.where.line(key)))

    def add_at_first_present(self, keys: Sequence[str], message: str) -> None:
        """Blame the first of ``keys`` that the file sets (defaults have no line)."""
        for k in keys:
            if self.where.has(k):
                self.add(k, message)
                return
        self.add(keys[0], message)

    def sorted(self) -> list[ConfigError]:
        return sorted(self.items, key=lambda e: (e.line is None, e.line or 0))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        errors = self.sorted()
        if len(errors) == 1:
            raise errors[0]
        raise ConfigErrors(errors)


def toml_error(text: str, err: tomllib.TOMLDecodeError) -> ConfigError:
    """tomllib's words, with the line where the syntax breaks and the key being set there.

    tomllib reports where it gave up, which for an array left open is the first line after
    it ("line 3, column 1" for an unclosed array on line 2). :func:`_syntax_break` moves such
    errors back to the last line with content inside the open array.
    """
    msg = str(err)
    lines = text.splitlines()
    m = re.search(r"\s*\((?:at line (\d+), column (\d+)|at end of document)\)\s*$", msg)
    if not m:
        return ConfigError(f"not valid TOML: {msg}")
    words = msg[: m.start()]
    if m.group(1):
        line, col = int(m.group(1)), int(m.group(2))
        offset = sum(len(x) + 1 for x in text.split("\n")[: line - 1]) + col - 1
        gave_up = f"at line {line}"
    else:
        line, offset, gave_up = max(len(lines), 1), len(text), "at the end of the file"
    brk = _syntax_break(text[:offset])
    if brk.string_line is not None and brk.string_line != line:
        return ConfigError(
            f"not valid TOML: this string is not closed; tomllib: {words} {gave_up}",
            key=brk.key,
            line=brk.string_line,
        )
    if brk.open_line is not None and brk.blank_before:
        where = (
            "']' missing"
            if brk.open_line == brk.last_line
            else f"']' or ',' missing (the array starts on line {brk.open_line})"
        )
        return ConfigError(
            f"not valid TOML: {where}; tomllib: {words} {gave_up}",
            key=brk.key,
            line=brk.last_line,
        )
    return ConfigError(f"not valid TOML: {words}", key=brk.key, line=line)


@dataclass(slots=True)
class _Break:
    key: str | None = None  # the key whose value is open at the cut, if any
    open_line: int | None = None  # line of the outermost '[' or '{' still open in a value
    last_line: int = 1  # last line with content (not blank, not a comment)
    blank_before: bool = True  # nothing but blanks/comments on the cut's own line
    string_line: int | None = None  # where a string still open at the cut starts


def _syntax_break(head: str) -> _Break:  # noqa: C901 - one branch per TOML syntax error tomllib reports
    """Scan TOML text up to the point where tomllib failed: which value is still open.

    Only brackets inside values count (``[table]`` headers do not); strings and comments are
    skipped. Good enough for syntax errors, which is all it is used for.
    """
    b = _Break()
    depth: list[int] = []
    in_value = False
    line = 1
    i = 0
    n = len(head)
    while i < n:
        c = head[i]
        if c == "\n":
            line += 1
            b.blank_before = True
            if not depth:
                in_value = False
                b.key = None
            i += 1
            continue
        if c in " \t\r":
            i += 1
            continue
        if c == "#":
            j = head.find("\n", i)
            i = n if j < 0 else j
            continue
        b.last_line, b.blank_before = line, False
        if c in "\"'":
            q = head[i : i + 3] if head.startswith(c * 3, i) else c
            j = i + len(q)
            while j < n and not head.startswith(q, j):
                j += 2 if head[j] == "\\" and c == '"' else 1
            if j >= n:
                b.string_line = line
            line += head.count("\n", i, min(j, n))
            i = j + len(q)
        elif not in_value:
            if c == "[":  # a table header: skip it, no value is open after it
                j = head.find("\n", i)
                i = n if j < 0 else j
                continue
            j = head.find("=", i)
            eol = head.find("\n", i)
            if j < 0 or 0 <= eol < j:  # a key without '=' on its line: the error is here
                i = n if eol < 0 else eol
                continue
            b.key = head[i:j].strip().strip("\"'") or None
            in_value = True
            i = j + 1
        else:
            if c in "[{":
                if not depth:
                    b.open_line = line
                depth.append(line)
            elif c in "]}" and depth:
                depth.pop()
                if not depth:
                    b.open_line = None
            i += 1
    return b


