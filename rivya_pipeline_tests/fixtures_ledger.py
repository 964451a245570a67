"""A ledger of its own for each test: a SQLite file in the test's temporary folder (test_ledger.py runs every
ledger test on PostgreSQL too, with a `ledger` fixture of its own)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rivya_pipeline.ledger import Ledger


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    opened = Ledger(Ledger.default_url(tmp_path))
    yield opened
    opened.close()
