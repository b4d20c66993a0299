"""Every Python block of README.md and docs/ runs as written (see ``docs_blocks.py`` for the conventions)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from docs_blocks import ROOT, blocks_of, pages

PAGES = [p for p in pages() if any(b.skip_reason is None for b in blocks_of(p))]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_code_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    monkeypatch.setenv("IMPLICITKIT_CACHE", str(tmp_path / "cache"))  # the digits sets a page builds
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for block in blocks_of(page):
        if block.skip_reason is not None:
            continue
        code = compile("\n" * (block.line - 1) + block.code, str(page), "exec")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a page may show a warning on purpose; its text is not checked
            try:
                exec(code, namespace)
            except Exception as error:
                raise AssertionError(
                    f"{page.relative_to(ROOT)}:{block.line}: this block fails as written: {error!r}"
                ) from error


def test_every_skipped_block_says_why():
    for page in pages():
        for block in blocks_of(page):
            assert block.skip_reason is None or block.skip_reason.strip(), f"{page.name}:{block.line}"


def test_the_collector_sees_blocks_and_setups(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n<!-- test-setup\nx = 1\n-->\n```python\ny = x + 1\n```\n"
        "<!-- no-test: needs COCO -->\n```python\nraise SystemExit\n```\n"
    )
    blocks = blocks_of(page)
    assert [(b.setup, b.skip_reason, b.code) for b in blocks] == [
        (True, None, "x = 1\n"),
        (False, None, "y = x + 1\n"),
        (False, "needs COCO", "raise SystemExit\n"),
    ]
    assert blocks[1].line == 6
    assert os.fspath(blocks[0].page) == os.fspath(page)
