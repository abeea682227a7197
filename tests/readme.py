"""The README's Interop snippets, read by the tests that run them (so the README cannot drift from what works)."""

from __future__ import annotations

import os
import re
import shlex

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_block(name: str) -> str:
    """The fenced block right after the `<!-- interop: NAME ... -->` marker."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    m = re.search(rf"<!-- interop: {re.escape(name)}\b[^>]*-->\s*```\w*\n(.*?)```", text, re.S)
    if m is None:
        raise AssertionError(f"README.md has no interop block {name!r}")
    return m.group(1)


def readme_commands(name: str, replace: dict[str, str]) -> list[list[str]]:
    """The block's command lines as argv lists, each path prefix in `replace` substituted."""
    out = []
    for line in readme_block(name).splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            argv = []
            for word in shlex.split(line):
                for old, new in replace.items():
                    word = word.replace(old, new)
                argv.append(word)
            out.append(argv)
    return out
