"""A folder of many briefs costs what changed in it, not its size: discovery parses only files that changed and
hashes each reference image once per change; a run reads only its own brief's file, named by the index discovery
keeps in the ledger, and reads the whole folder only when that file no longer holds the brief."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from rivya_pipeline import briefs as briefs_module
from rivya_pipeline.briefs import BriefErrors, load_brief_by_id, scan_briefs
from rivya_pipeline.ledger import Ledger
from rivya_pipeline.rivya import generation
from rivya_pipeline.settings import REPO_ROOT

IMAGE = REPO_ROOT / "requests" / "images" / "product.png"
TICK = datetime(2026, 5, 11, 8, tzinfo=UTC)


def write(folder: Path, name: str, brief_id: str, prompt: str, reference: str | None = None) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"id: {brief_id}\nprompt: {prompt}\n" + (f"references: [{reference}]\n" if reference else "")
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """Every file the briefs module parses from now on (a fresh process: nothing remembered)."""
    seen: list[Path] = []
    parse = briefs_module._file_entries

    def counting(path: Path, text: bytes) -> list:
        seen.append(path)
        return parse(path, text)

    monkeypatch.setattr(briefs_module, "_file_entries", counting)
    monkeypatch.setattr(briefs_module, "_readings", {})
    generation._sniffed_and_hashed.cache_clear()
    yield seen


def test_an_unchanged_folder_is_parsed_once_and_a_shared_reference_hashed_once(tmp_path: Path, parsed):
    shutil.copy(IMAGE, tmp_path / "product.png")
    for index in range(10):
        write(tmp_path, f"b{index}.yaml", f"brief-{index}", f"Take {index} of a bottle.", "product.png")

    first, first_errors = scan_briefs(tmp_path)
    second, _ = scan_briefs(tmp_path)

    assert len(first) == 10 and not first_errors
    assert len(parsed) == 10  # the second reading parsed nothing
    assert [b.id for b in second] == [b.id for b in first]
    assert generation._sniffed_and_hashed.cache_info().misses == 1  # ten briefs, one image, read once


def test_only_the_changed_file_is_parsed_again(tmp_path: Path, parsed):
    for index in range(5):
        write(tmp_path, f"b{index}.yaml", f"brief-{index}", f"Take {index} of a kite.")
    scan_briefs(tmp_path)
    parsed.clear()

    write(tmp_path, "b3.yaml", "brief-3", "Take 3 of a kite, at night.")
    found, _ = scan_briefs(tmp_path)

    assert parsed == [tmp_path / "b3.yaml"]
    assert next(b for b in found if b.id == "brief-3").prompt == "Take 3 of a kite, at night."


def test_a_duplicate_id_is_still_refused_when_the_first_file_comes_from_memory(tmp_path: Path, parsed):
    """Failure mode: a remembered reading skips the check that ids are unique across the folder."""
    write(tmp_path, "a.yaml", "lighthouse", "A lighthouse in a storm.")
    scan_briefs(tmp_path)

    write(tmp_path, "b.yaml", "lighthouse", "A lighthouse at dawn.")
    found, errors = scan_briefs(tmp_path)

    assert [b.source.name for b in found] == ["a.yaml"]
    assert [(e.field, e.brief_id) for e in errors] == [("id", "lighthouse")]
    assert "duplicate" in str(errors[0]) and "a.yaml" in str(errors[0])


def test_a_missing_reference_that_appears_makes_the_brief_valid_without_an_edit(tmp_path: Path, parsed):
    """Failure mode: a remembered "file not found" outlives the file's arrival."""
    write(tmp_path, "a.yaml", "bottle", "A bottle turning.", "product.png")
    _, errors = scan_briefs(tmp_path)
    assert [e.field for e in errors] == ["references[0]"]

    shutil.copy(IMAGE, tmp_path / "product.png")
    found, errors = scan_briefs(tmp_path)

    assert [b.id for b in found] == ["bottle"] and not errors


def test_a_lookup_with_its_file_known_reads_that_file_only(tmp_path: Path, parsed):
    write(tmp_path, "a.yaml", "first", "A lighthouse in a storm.")
    write(tmp_path, "nested/b.yaml", "second", "A lantern on a jetty.")
    (tmp_path / "broken.yaml").write_text("id: [unclosed\n", encoding="utf-8")

    brief = load_brief_by_id(tmp_path, "second", source=tmp_path / "nested" / "b.yaml")

    assert brief.prompt == "A lantern on a jetty."
    assert parsed == [tmp_path / "nested" / "b.yaml"]


def test_a_lookup_whose_file_moved_or_lies_outside_the_folder_reads_the_folder(tmp_path: Path, parsed):
    """Failure modes: a stale index row (the brief moved to another file), a row naming a file outside the folder."""
    write(tmp_path, "a.yaml", "first", "A lighthouse in a storm.")
    write(tmp_path, "b.yaml", "second", "A lantern on a jetty.")
    outside = write(tmp_path.parent / f"{tmp_path.name}-outside", "c.yaml", "second", "Not this one.")

    assert load_brief_by_id(tmp_path, "second", source=tmp_path / "a.yaml").prompt == "A lantern on a jetty."
    assert load_brief_by_id(tmp_path, "second", source=outside).prompt == "A lantern on a jetty."
    assert outside not in parsed


def test_a_lookup_whose_file_now_holds_a_broken_brief_reports_its_problem(tmp_path: Path, parsed):
    path = write(tmp_path, "a.yaml", "first", "A lighthouse in a storm.")
    path.write_text("id: first\nprompt: ''\n", encoding="utf-8")

    with pytest.raises(BriefErrors, match="prompt"):
        load_brief_by_id(tmp_path, "first", source=path)


def test_the_index_writes_what_changed_and_names_each_file(ledger: Ledger, tmp_path: Path):
    a, b = write(tmp_path, "a.yaml", "first", "One."), write(tmp_path, "sub/b.yaml", "second", "Two.")

    assert ledger.index_brief_files(tmp_path, {"first": a, "second": b}) == 2
    assert ledger.index_brief_files(tmp_path, {"first": a, "second": b}) == 0  # nothing new: nothing written
    assert ledger.index_brief_files(tmp_path, {"first": b, "second": b}) == 1
    assert ledger.brief_file(tmp_path, "first") == tmp_path / "sub" / "b.yaml"
    assert ledger.brief_file(tmp_path, "never-seen") is None
    assert ledger.brief_file(tmp_path / "sub", "first") is None  # another folder, another index


def test_after_discovery_a_fresh_run_process_reads_only_its_own_brief(pipeline, monkeypatch: pytest.MonkeyPatch):
    """Failure mode: every run process read the whole folder to find its one brief (k new briefs: k readings)."""
    (request, *_) = pipeline.discover(TICK).run_requests
    brief_id = request.partition_key
    indexed = pipeline.ledger.brief_file(pipeline.requests_path, brief_id)
    assert indexed is not None and load_brief_by_id(pipeline.requests_path, brief_id).source == indexed

    seen: list[Path] = []
    parse = briefs_module._file_entries
    monkeypatch.setattr(briefs_module, "_file_entries", lambda path, text: seen.append(path) or parse(path, text))
    monkeypatch.setattr(briefs_module, "_readings", {})  # as in a new run process

    result = pipeline.submit(brief_id, tags=dict(request.tags))  # the run discovery asked for: brief to paid task

    assert result.success
    assert set(seen) == {indexed}
