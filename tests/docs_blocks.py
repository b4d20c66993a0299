"""The Python code blocks of README.md and docs/*.md, in the order a reader meets them.

Every fenced ```python block is run, the blocks of one page in one namespace (a page reads like a notebook).
Two HTML comments, invisible on the rendered page, steer it:

- ``<!-- test-setup`` ... ``-->``: code run at that position before the next block, for names the page
  takes as given (a cell, an input batch, a criterion);
- ``<!-- no-test: why -->`` on the line before a fence: that block is not run, for the reason given (it needs
  COCO on disk, a GPU, or it is a signature rather than code).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^```python\s*$")
_SETUP = re.compile(r"^<!-- test-setup\s*$")
_NO_TEST = re.compile(r"^<!-- no-test: (.+) -->\s*$")


@dataclass(frozen=True)
class Block:
    """One piece of code of a page: a visible block or a hidden setup, with where it starts."""

    page: Path
    line: int  # 1-based line of the first code line
    code: str
    skip_reason: str | None = None
    setup: bool = False


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks_of(page: Path) -> list[Block]:
    """The page's setups and Python blocks in order; an unterminated fence or setup is an error."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opener = lines[i]
        if _FENCE.match(opener) or _SETUP.match(opener):
            closer = "```" if _FENCE.match(opener) else "-->"
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == closer), None)
            if end is None:
                raise ValueError(f"{page.name}:{i + 1}: block opened here is never closed with {closer!r}.")
            skip = _NO_TEST.match(lines[i - 1]) if i > 0 else None
            found.append(
                Block(
                    page,
                    i + 2,
                    "\n".join(lines[i + 1 : end]) + "\n",
                    skip.group(1) if skip else None,
                    setup=closer == "-->",
                )
            )
            i = end
        i += 1
    return found
