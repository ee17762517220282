"""The fenced blocks of README.md and docs/*.md, for the tests that keep the docs true.

A block may be preceded, on the line right before its opening fence, by an HTML comment
that says what it is: `<!-- invalid -->` marks a config example that must be refused (the
next block, when it starts with `$ bastion check FILE`, is the exact output). Python blocks
whose first line is `# pkg/module.py` are example modules, importable once written out.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_MARKER = re.compile(r"^<!--\s*([\w -]+?)\s*-->\s*$")
_MODULE_PATH = re.compile(r"^# ([\w/]+\.py)\n")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marker: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(lang: str | None = None) -> list[Block]:
    """Every fenced block of the docs (of one language), in file order."""
    found = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        for match in _FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            marker = _MARKER.match(before)
            found.append(Block(path, line, match.group(1), match.group(2), marker.group(1) if marker else None))
    return [b for b in found if lang is None or b.lang == lang]


def block_after(block: Block) -> Block | None:
    """The next fenced block of the same file."""
    same = [b for b in blocks() if b.path == block.path and b.line > block.line]
    return same[0] if same else None


def python_examples() -> dict[str, str]:
    """`pkg/module.py` -> source, for every Python block that names its file."""
    out = {}
    for block in blocks("python"):
        match = _MODULE_PATH.match(block.text)
        if match:
            out[match.group(1)] = block.text
    return out


@contextmanager
def importable_examples(where: Path) -> Iterator[None]:
    """The docs' example modules written under `where` and importable (my_pkg.plugins, ...)."""
    packages: set[str] = set()
    for name, source in python_examples().items():
        path = where / name
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(where).parents:
            if str(parent) != ".":
                (where / parent / "__init__.py").touch()
                packages.add(str(parent).split("/")[0])
        path.write_text(source, encoding="utf-8")
    sys.path.insert(0, str(where))
    try:
        yield
    finally:
        sys.path.remove(str(where))
        for module in [m for m in sys.modules if m.split(".")[0] in packages]:
            del sys.modules[module]
