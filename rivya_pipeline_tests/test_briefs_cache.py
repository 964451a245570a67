"""Looking a brief up by id reuses the last reading of its folder, and never once the folder has changed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rivya_pipeline.briefs import BriefErrors, BriefNotFound, load_brief_by_id
from rivya_pipeline.settings import REPO_ROOT

IMAGES = REPO_ROOT / "requests" / "images"


def write(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text, encoding="utf-8")


def brief(brief_id: str, prompt: str, reference: str | None = None) -> str:
    return f"id: {brief_id}\nprompt: {prompt}\n" + (f"references: [{reference}]\n" if reference else "")


def test_an_unchanged_folder_is_read_once_for_every_lookup(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", brief("first", "A lighthouse in a storm."))
    write(tmp_path, "b.yaml", brief("second", "A lantern on a jetty."))

    assert load_brief_by_id(tmp_path, "first") is load_brief_by_id(tmp_path, "first")
    assert load_brief_by_id(tmp_path, "second").prompt == "A lantern on a jetty."


def test_an_edited_brief_is_read_again_even_with_the_same_size_and_time(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    write(tmp_path, "a.yaml", brief("first", "A lighthouse in a storm."))
    before = load_brief_by_id(tmp_path, "first")
    stat = path.stat()

    write(tmp_path, "a.yaml", brief("first", "A lighthouse in a gale."))  # same length
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    after = load_brief_by_id(tmp_path, "first")
    assert after.prompt == "A lighthouse in a gale." and after.content_hash != before.content_hash


def test_a_replaced_reference_image_changes_the_brief(tmp_path: Path) -> None:
    (tmp_path / "ref.png").write_bytes((IMAGES / "product.png").read_bytes())
    write(tmp_path, "a.yaml", brief("first", "A bottle turning.", "ref.png"))
    before = load_brief_by_id(tmp_path, "first")

    (tmp_path / "ref.png").write_bytes((IMAGES / "product.png").read_bytes() + b"\0")  # another file, same type

    after = load_brief_by_id(tmp_path, "first")
    assert after.request.references[0].sha256 != before.request.references[0].sha256


def test_added_and_removed_briefs_are_seen(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", brief("first", "A lighthouse in a storm."))
    with pytest.raises(BriefNotFound):
        load_brief_by_id(tmp_path, "later")

    write(tmp_path, "b.yaml", brief("later", "A lantern on a jetty."))
    assert load_brief_by_id(tmp_path, "later").prompt == "A lantern on a jetty."

    (tmp_path / "b.yaml").unlink()
    with pytest.raises(BriefNotFound):
        load_brief_by_id(tmp_path, "later")


def test_a_folder_created_after_a_failed_lookup_is_read(tmp_path: Path) -> None:
    folder = tmp_path / "briefs"
    with pytest.raises(BriefErrors):
        load_brief_by_id(folder, "first")

    folder.mkdir()
    write(folder, "a.yaml", brief("first", "A lighthouse in a storm."))
    assert load_brief_by_id(folder, "first").id == "first"
