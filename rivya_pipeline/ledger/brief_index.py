"""Where each brief was last seen in its folder, kept by discovery, so that a run reads its own brief's file only.

A run process starts with nothing in memory: without this, finding one brief by id means reading every file of the
folder (ids are unique across it), and k new briefs cost k readings of the whole folder. The index is a hint, never
the truth: `briefs.load_brief_by_id` checks that the file still holds a valid brief with that id and reads the
whole folder when it does not.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError

from ..batching import chunks
from .database import LedgerPart
from .schema import brief_files

ROWS_PER_STATEMENT = 5000  # below SQLite's limit of bound values per statement
# (database, folder) -> the rows this process last found or wrote: a code server evaluates discovery again and
# again, and a tick with nothing new then reads and writes no row. A hint may go stale (another process indexing
# the same folder, a person editing the table); `load_brief_by_id` checks every hint it uses.
_remembered: dict[tuple[str, str], dict[str, str]] = {}


class BriefIndex(LedgerPart):
    def brief_file(self, folder: Path, brief_id: str) -> Path | None:
        """The file the brief was last seen in (under `folder`), or None when it was never indexed."""
        query = select(brief_files.c.path).where(
            brief_files.c.folder == str(folder.resolve()), brief_files.c.brief_id == brief_id
        )
        with self._db.read() as conn:
            path = conn.execute(query).scalar()
        return None if path is None else folder / path

    def index_brief_files(self, folder: Path, files: Mapping[str, Path]) -> int:
        """Record brief id -> file (each under `folder`) where it changed; the number of rows written.

        One read of the folder's rows (the first time in this process) and a write of the changed ones only: a tick
        with nothing new reads and writes nothing. Two writers racing over the same rows (two discoveries of one
        folder) leave one's rows; either is right.
        """
        key = str(folder.resolve())
        wanted = {brief_id: _relative(path, folder) for brief_id, path in files.items()}
        memory = (self._db.identity, key)
        known = _remembered.get(memory)
        if known is None:
            with self._db.read() as conn:
                known = dict(
                    conn.execute(
                        select(brief_files.c.brief_id, brief_files.c.path).where(brief_files.c.folder == key)
                    ).all()
                )
            _remembered[memory] = known
        changed = {brief_id: path for brief_id, path in wanted.items() if known.get(brief_id) != path}
        if not changed:
            return 0
        rows = [{"folder": key, "brief_id": brief_id, "path": path} for brief_id, path in changed.items()]
        try:
            with self._db.write() as conn:
                for chunk in chunks(rows, ROWS_PER_STATEMENT):
                    ids = [row["brief_id"] for row in chunk]
                    conn.execute(
                        delete(brief_files).where(brief_files.c.folder == key, brief_files.c.brief_id.in_(ids))
                    )
                    conn.execute(insert(brief_files), list(chunk))
        except IntegrityError:
            _remembered.pop(memory, None)  # another writer's rows are there: read them next time
            return 0
        known.update(changed)
        return len(rows)


def _relative(path: Path, folder: Path) -> str:
    """`path` under `folder` as a POSIX path relative to it; by its text where it starts with the folder's (a tick
    asks for every brief of the folder: `relative_to` cost more than the rest of an unchanged tick's index)."""
    text, prefix = str(path), str(folder) + os.sep
    if text.startswith(prefix) and os.sep == "/":
        return text[len(prefix) :]
    return path.relative_to(folder).as_posix()
