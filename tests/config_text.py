"""Config text for tests: fragments that test one key get the keys every file must set.

``with_required(text)`` puts the required keys the fragment leaves out at the top, set to
``Config()``'s defaults, so ``load_config(with_required("")) == Config()``. Line numbers in
the result move down by ``missing_lines(text)``.
"""

from __future__ import annotations

import re

# Config()'s defaults for the keys load_config requires.
REQUIRED = {"outside_interface": '"wan0"', "inside_networks": '["10.0.0.0/8"]'}


def _missing(text: str) -> list[str]:
    return [k for k in REQUIRED if not re.search(rf"^{k}\s*=", text, re.M)]


def missing_lines(text: str) -> int:
    return len(_missing(text))


def with_required(text: str) -> str:
    return "".join(f"{k} = {REQUIRED[k]}\n" for k in _missing(text)) + text
