"""Briefs folder loading: every way a user's YAML can be wrong, and what a good folder turns into."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import pytest

from rivya_pipeline.briefs import (
    BriefError,
    BriefErrors,
    BriefNotFound,
    load_brief_by_id,
    load_briefs,
)
from rivya_pipeline.rivya.models import ModelInfo, ModelParam
from rivya_pipeline.settings import Settings

Writer = Callable[[Path], None]
LIMIT = 10_000_000


@functools.cache
def png_bytes(red: int = 200) -> bytes:
    """A real 8x8 PNG drawn with PyAV; `red` varies the bytes for hash tests."""
    frame = av.VideoFrame(8, 8, "rgb24")
    row = bytes([red, 40, 40]) * 8 + bytes(frame.planes[0].line_size - 24)
    frame.planes[0].update(row * 8)
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt, codec.time_base = 8, 8, "rgb24", Fraction(1, 25)
    return b"".join(bytes(packet) for packet in [*codec.encode(frame), *codec.encode(None)])


def png(size: int | None = None, red: int = 200) -> Writer:
    """A PNG file, zero-padded (sparsely) to `size` bytes: its signature still says image/png."""

    def write(path: Path) -> None:
        with path.open("wb") as out:
            out.write(png_bytes(red))
            if size is not None:
                out.truncate(size)

    return write


def raw(content: bytes) -> Writer:
    return lambda path: path.write_bytes(content)


def write_files(folder: Path, files: dict[str, Writer | str]) -> None:
    """Texts are YAML briefs; writers make images. Paths are relative to `folder` and may climb out of it."""
    for relative, content in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            content(path)


GOOD = "id: ok\nprompt: A red fox trots across fresh snow at dawn.\n"


def with_prompt(prompt: str) -> str:
    return f"id: ok\nprompt: '{prompt}'\n"


@dataclass(frozen=True)
class Case:
    brief: str
    expected: tuple[str, ...]
    files: dict[str, Writer | str] = field(default_factory=dict)


CASES = {
    # --- files
    "yaml syntax error": Case(
        "id: ok\nprompt: fine\nparams:\n  duration: 5\n   sound: false\n",
        ("brief.yaml: yaml: syntax error at line 5", "mapping values are not allowed"),
    ),
    "not utf-8": Case(GOOD, ("brief.yaml: file: not UTF-8 text",), {"brief.yaml": raw(b"id: caf\xe9\n")}),
    "empty file": Case("", ("brief.yaml: top level: must be one brief", "got nothing")),
    "top level list": Case(
        "- " + GOOD.replace("\n", "\n  "), ("brief.yaml: top level:", "under `requests:`, got list")
    ),
    "top level text": Case("just some words\n", ("brief.yaml: top level:", "got str")),
    "requests beside other keys": Case("requests: []\nid: ok\n", ("top level: a file with `requests:`", "found: id")),
    "requests not a list": Case("requests:\n  id: ok\n  prompt: x\n", ("brief.yaml: requests: must be a list", "dict")),
    "requests null": Case("requests:\n", ("requests: must be a list of briefs, got nothing",)),
    "brief not a mapping": Case("requests:\n  - just a string\n", ("brief.yaml: brief #1: brief: must be a mapping",)),
    # --- id
    "missing id": Case("prompt: x\n", ("brief.yaml: brief #1: id: is required",)),
    "id not text": Case("id: 42\nprompt: x\n", ("brief #1: id: must be text, got int 42",)),
    "id with a space": Case("id: sun rise\nprompt: x\n", ("brief #1: id: 'sun rise' is not a slug",)),
    "id path traversal": Case("id: ../x\nprompt: x\n", ("brief #1: id: '../x' is not a slug",)),
    "id uppercase": Case("id: Sunrise\nprompt: x\n", ("brief #1: id: 'Sunrise' is not a slug", "lowercase")),
    "id starts with dash": Case("id: -x\nprompt: x\n", ("id: '-x' is not a slug", "starting with a letter or digit")),
    "id 65 characters": Case(f"id: {'a' * 65}\nprompt: x\n", ("brief #1: id: is 65 characters, at most 64",)),
    "duplicate id in one file": Case(
        "requests:\n  - id: dup\n    prompt: x\n  - id: dup\n    prompt: y\n",
        ("brief.yaml: brief 'dup': id: duplicate: brief #2 here reuses the id of brief #1 in", "brief.yaml"),
    ),
    "duplicate id across files": Case(
        "id: dup\nprompt: x\n",
        ("zz/later.yaml: brief 'dup': id: duplicate: brief #1 here reuses the id of brief #1 in", "/brief.yaml"),
        {"zz/later.yaml": "id: dup\nprompt: y\n"},
    ),
    # --- prompt
    "missing prompt": Case("id: ok\n", ("brief.yaml: brief 'ok': prompt: is required",)),
    "empty prompt": Case("id: ok\nprompt: ''\n", ("brief 'ok': prompt: must not be empty",)),
    "whitespace prompt": Case("id: ok\nprompt: '   '\n", ("brief 'ok': prompt: must not be empty",)),
    "prompt not text": Case("id: ok\nprompt: [a, b]\n", ("brief 'ok': prompt: must be text, got list",)),
    "prompt 2001 characters": Case(with_prompt("x" * 2001), ("prompt: 2001 characters is over the limit of 2000",)),
    "prompt 2001 accented": Case(with_prompt("é" * 2001), ("prompt: 2001 characters is over the limit of 2000",)),
    "prompt 2001 emoji": Case(with_prompt("🎬" * 2001), ("prompt: 2001 characters is over the limit of 2000",)),
    # --- params
    "params not a mapping": Case(GOOD + "params: [duration, 5]\n", ("brief 'ok': params: must be a mapping", "list")),
    "duration 2": Case(GOOD + "params: {duration: 2}\n", ("brief 'ok': params.duration: must be one of", "(got 2)")),
    "duration 16": Case(GOOD + "params: {duration: 16}\n", ("params.duration: must be one of 3, 4", "(got 16)")),
    "duration text 5.5": Case(GOOD + "params: {duration: '5.5'}\n", ("params.duration:", "(got '5.5')")),
    "duration 5.5": Case(GOOD + "params: {duration: 5.5}\n", ("params.duration:", "(got 5.5)")),
    "duration true": Case(GOOD + "params: {duration: true}\n", ("params.duration:", "(got True)")),
    "aspect ratio 4:3": Case(GOOD + "params:\n  aspect_ratio: 4:3\n", ("params.aspect_ratio:", "(got '4:3')")),
    "mode turbo": Case(GOOD + "params: {mode: turbo}\n", ("params.mode: must be one of std, pro", "(got 'turbo')")),
    "unknown param": Case(GOOD + "params: {fps: 30}\n", ("params.fps: unknown parameter for kling-3-0",)),
    "referenceMediaItems in params": Case(
        GOOD + "params:\n  referenceMediaItems: [{url: 'https://x/a.png', kind: image}]\n",
        ("brief 'ok': params.referenceMediaItems: not allowed", "`references:`"),
    ),
    # --- references
    "references not a list": Case(GOOD + "references: a.png\n", ("brief 'ok': references: must be a list", "str")),
    "reference not a path": Case(GOOD + "references: [42]\n", ("brief 'ok': references[0]: must be an image path",)),
    "three references": Case(
        GOOD + "references: [a.png, b.png, c.png]\n",
        ("brief 'ok': references: 3 given, kling-3-0 accepts at most 2",),
        {"a.png": png(), "b.png": png(), "c.png": png()},
    ),
    "missing reference": Case(GOOD + "references: [gone.png]\n", ("brief 'ok': references[0]: file not found",)),
    "absolute reference": Case(GOOD + "references: [/tmp/a.png]\n", ("references[0]: absolute path '/tmp/a.png'",)),
    "reference escaping the folder": Case(
        GOOD + "references: [ok.png, ../outside.png]\n",
        ("brief 'ok': references[1]: '../outside.png' is outside the requests folder",),
        {"ok.png": png(), "../outside.png": png()},
    ),
    "gif reference": Case(
        GOOD + "references: [anim.gif]\n",
        ("references[0]: content is image/gif, must be one of image/jpeg, image/png, image/webp",),
        {"anim.gif": raw(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;")},
    ),
    "text named png": Case(
        GOOD + "references: [notes.png]\n",
        ("references[0]: content is not a recognised image",),
        {"notes.png": raw(b"just some notes, not an image\n")},
    ),
    "empty image": Case(GOOD + "references: [empty.png]\n", ("references[0]: file is empty",), {"empty.png": raw(b"")}),
    "image one byte over 10 MB": Case(
        GOOD + "references: [big.png]\n",
        ("references[0]: 10,000,001 bytes is over the limit of 10,000,000 bytes",),
        {"big.png": png(size=LIMIT + 1)},
    ),
    # --- model, regenerate, keys
    "unknown model": Case(GOOD + "model: sora-9\n", ("brief 'ok': model: unknown model 'sora-9' (known: kling-3-0)",)),
    "regenerate negative": Case(GOOD + "regenerate: -1\n", ("brief 'ok': regenerate: must be a whole number >= 0",)),
    "regenerate text": Case(GOOD + "regenerate: again\n", ("regenerate: must be a whole number >= 0, got 'again'",)),
    "regenerate float": Case(GOOD + "regenerate: 1.5\n", ("regenerate: must be a whole number >= 0, got 1.5",)),
    "regenerate bool": Case(GOOD + "regenerate: true\n", ("regenerate: must be a whole number >= 0, got True",)),
    "unknown top-level key": Case(
        GOOD + "duraton: 5\n",
        ("brief 'ok': duraton: unknown key (allowed: id, prompt, params, references, model, regenerate)",),
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_brief_is_refused_with_one_line_naming_file_brief_and_field(tmp_path: Path, case: Case) -> None:
    folder = tmp_path / "requests"
    write_files(folder, {"brief.yaml": case.brief, **case.files})

    with pytest.raises(BriefErrors) as caught:
        load_briefs(folder)

    [error] = caught.value.errors
    assert str(caught.value) == str(error)
    assert "\n" not in str(error)
    for expected in case.expected:
        assert expected in str(error)
    assert f"{error.field}: {error.rule}" in str(error)


def test_shipped_requests_folder_loads_with_its_references() -> None:
    briefs = load_briefs(Settings.from_env({}).requests_path)

    assert {b.id: len(b.references) for b in briefs} == {"sunrise-timelapse": 0, "product-spin": 1, "city-morph": 2}
    city = next(b for b in briefs if b.id == "city-morph")
    assert [r.mime_type for r in city.request.references] == ["image/jpeg", "image/webp"]
    assert city.request.params["aspect_ratio"] == "9:16"


def test_single_list_and_nested_files_load_in_sorted_path_order(tmp_path: Path) -> None:
    write_files(
        tmp_path,
        {
            "b.yml": "requests:\n  - id: b-one\n    prompt: first\n  - id: b-two\n    prompt: second\n",
            "a.yaml": "id: a\nprompt: single form\n",
            "c/deeper/c.yaml": "id: c_nested\nprompt: found recursively\n",
            "notes.txt": "id: ignored\nprompt: not a brief file\n",
            "requests-empty.yaml": "requests: []\n",
        },
    )

    briefs = load_briefs(tmp_path)

    assert [(b.id, b.source.relative_to(tmp_path).as_posix(), b.index) for b in briefs] == [
        ("a", "a.yaml", 0),
        ("b-one", "b.yml", 0),
        ("b-two", "b.yml", 1),
        ("c_nested", "c/deeper/c.yaml", 0),
    ]
    assert briefs[0].model == "kling-3-0"
    assert briefs[0].regenerate == 0


def test_natural_values_are_kept_as_written_and_sent_as_api_strings(tmp_path: Path) -> None:
    write_files(
        tmp_path,
        {"a.yaml": GOOD + "params:\n  duration: 5\n  sound: true\n  multi_shots: no\n  aspect_ratio: 9:16\n"},
    )

    [brief] = load_briefs(tmp_path)

    assert brief.params == {"duration": 5, "sound": True, "multi_shots": False, "aspect_ratio": "9:16"}
    assert brief.request.params == {
        "mode": "pro",
        "multi_shots": "false",
        "duration": "5",
        "sound": "true",
        "aspect_ratio": "9:16",
    }


def test_references_resolve_relative_to_their_file_and_may_sit_anywhere_in_the_folder(tmp_path: Path) -> None:
    write_files(
        tmp_path,
        {
            "images/limit.png": png(size=LIMIT),
            "images/small.png": png(),
            "team/brief.yaml": GOOD + "references: [../images/limit.png, ../images/./small.png]\n",
        },
    )

    [brief] = load_briefs(tmp_path)

    assert brief.references == ((tmp_path / "images/limit.png").resolve(), (tmp_path / "images/small.png").resolve())
    assert all(path.is_absolute() for path in brief.references)
    assert [r.size_bytes for r in brief.request.references] == [LIMIT, len(png_bytes())]


def content_hash(folder: Path, text: str, files: dict[str, Writer | str] | None = None) -> str:
    write_files(folder, {"brief.yaml": text, **(files or {})})
    [brief] = load_briefs(folder)
    return brief.content_hash


REFERENCED = GOOD + "params: {duration: 5, sound: false}\nreferences: [ref.png]\n"


def test_content_hash_ignores_comments_key_order_whitespace_and_value_spelling(tmp_path: Path) -> None:
    reformatted = (
        "# the same brief, written differently\n"
        "references:\n  - ref.png   # the product\n"
        "params:\n  sound: false\n  duration: '5'\n"
        "prompt:    A red fox trots across fresh snow at dawn.\n"
        "id: ok\n"
    )

    original = content_hash(tmp_path / "original", REFERENCED, {"ref.png": png()})

    assert content_hash(tmp_path / "reformatted", reformatted, {"ref.png": png()}) == original


@pytest.mark.parametrize(
    ("changed", "files"),
    [
        pytest.param(REFERENCED.replace("fresh snow", "deep snow"), {}, id="prompt"),
        pytest.param(REFERENCED.replace("duration: 5", "duration: 6"), {}, id="params"),
        pytest.param(REFERENCED, {"ref.png": png(red=90)}, id="reference bytes"),
        pytest.param(REFERENCED + "regenerate: 1\n", {}, id="regenerate bumped"),
    ],
)
def test_content_hash_changes_with_what_is_asked(tmp_path: Path, changed: str, files: dict[str, Writer]) -> None:
    original = content_hash(tmp_path / "original", REFERENCED, {"ref.png": png()})

    assert content_hash(tmp_path / "changed", changed, {"ref.png": png(), **files}) != original


KLING_2_6 = ModelInfo(
    id="kling-2-6",
    base_credits=60,
    max_prompt_length=2500,
    api_status="available",
    params=[ModelParam(key="aspectRatio", default="16:9", options=["16:9", "9:16"])],
)


def test_catalog_models_are_validated_with_their_own_params(tmp_path: Path) -> None:
    write_files(
        tmp_path,
        {
            "new.yaml": "id: new-model\nprompt: x\nmodel: kling-2-6\nparams: {aspectRatio: '9:16'}\n",
            "default.yaml": GOOD,
        },
    )

    briefs = load_briefs(tmp_path, model_specs={KLING_2_6.id: KLING_2_6})

    assert {b.id: (b.model, b.request.params) for b in briefs} == {
        "ok": (
            "kling-3-0",
            {"mode": "pro", "multi_shots": "false", "duration": "5", "sound": "false", "aspect_ratio": "16:9"},
        ),
        "new-model": ("kling-2-6", {"aspectRatio": "9:16"}),
    }
    (tmp_path / "new.yaml").write_text("id: new-model\nprompt: x\nmodel: kling-2-6\nparams: {aspect_ratio: '9:16'}\n")
    with pytest.raises(BriefErrors, match=r"brief 'new-model': params\.aspect_ratio: unknown parameter for kling-2-6"):
        load_briefs(tmp_path, model_specs={KLING_2_6.id: KLING_2_6})


def test_every_problem_in_the_folder_is_reported_at_once(tmp_path: Path) -> None:
    write_files(
        tmp_path,
        {
            "a.yaml": "id: good\nprompt: fine\n",
            "b.yaml": "requests:\n  - id: Bad\n    prompt: ''\n    params: {mode: turbo}\n  - id: good\n",
            "c.yaml": "id: [oops\n",
        },
    )

    with pytest.raises(BriefErrors) as caught:
        load_briefs(tmp_path)

    lines = str(caught.value).splitlines()
    assert [(Path(e.file).name, e.brief_id, e.index, e.field) for e in caught.value.errors] == [
        ("b.yaml", None, 0, "id"),
        ("b.yaml", None, 0, "prompt"),
        ("b.yaml", None, 0, "params.mode"),
        ("b.yaml", "good", 1, "id"),
        ("b.yaml", "good", 1, "prompt"),
        ("c.yaml", None, None, "yaml"),
    ]
    assert len(lines) == 6
    assert lines[0].endswith(
        "b.yaml: brief #1: id: 'Bad' is not a slug: use lowercase letters, digits, '-' and '_', "
        "starting with a letter or digit"
    )
    assert "a.yaml" in lines[3]


def test_load_brief_by_id_finds_a_brief_despite_problems_elsewhere(tmp_path: Path) -> None:
    write_files(
        tmp_path,
        {
            "a.yaml": "id: wanted\nprompt: fine\n",
            "b.yaml": "id: broken\nprompt: ''\n",
            "c.yaml": "id: [oops\n",
        },
    )

    assert load_brief_by_id(tmp_path, "wanted").prompt == "fine"
    with pytest.raises(BriefErrors, match=r"^\S*b\.yaml: brief 'broken': prompt: must not be empty$"):
        load_brief_by_id(tmp_path, "broken")


def test_load_brief_by_id_refuses_a_duplicated_id(tmp_path: Path) -> None:
    write_files(tmp_path, {"a.yaml": "id: twice\nprompt: one\n", "b.yaml": "id: twice\nprompt: two\n"})

    with pytest.raises(
        BriefErrors,
        match=r"b\.yaml: brief 'twice': id: duplicate: brief #1 here reuses the id of brief #1 in \S*a\.yaml",
    ):
        load_brief_by_id(tmp_path, "twice")


def test_load_brief_by_id_reports_an_absent_id(tmp_path: Path) -> None:
    write_files(tmp_path, {"a.yaml": GOOD})

    with pytest.raises(BriefNotFound) as caught:
        load_brief_by_id(tmp_path, "deleted-brief")

    assert isinstance(caught.value, KeyError)
    assert isinstance(caught.value, BriefError)
    assert str(caught.value) == f"{tmp_path}: brief 'deleted-brief': id: no brief with this id in the folder"


def test_absent_id_in_a_folder_with_unreadable_files_lists_them(tmp_path: Path) -> None:
    write_files(tmp_path, {"a.yaml": GOOD, "b.yaml": "id: [oops\n"})

    with pytest.raises(BriefErrors) as caught:
        load_brief_by_id(tmp_path, "maybe-in-b")

    assert [e.field for e in caught.value.errors] == ["yaml", "id"]
    assert isinstance(caught.value.errors[-1], BriefNotFound)


def test_missing_folder_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BriefErrors, match=r"nowhere: folder: not a folder \(set RIVYA_REQUESTS_PATH"):
        load_briefs(tmp_path / "nowhere")


def test_requests_path_comes_from_the_environment(tmp_path: Path) -> None:
    default = Settings.from_env({}).requests_path
    assert default.name == "requests"
    assert (default.parent / "pyproject.toml").is_file()

    assert Settings.from_env({"RIVYA_REQUESTS_PATH": str(tmp_path)}).requests_path == tmp_path.resolve()


def test_the_folder_walk_finds_the_files_rglob_finds(tmp_path):
    """One walk of the folder stands in for two rglob passes: nested folders, both suffixes, a folder named like a
    brief, other files, a symlinked folder (not entered, as rglob does not) and a symlinked brief file (found)."""
    from rivya_pipeline.briefs import _brief_files

    for name in ("a.yaml", "b.yml", "notes.txt", "x.YAML", "deep/er/c.yaml", "deep/d.yml", "other/e.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("id: x\n")
    (tmp_path / "folder.yaml").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "other", target_is_directory=True)
    (tmp_path / "link.yaml").symlink_to(tmp_path / "a.yaml")

    found = _brief_files(tmp_path)

    assert found == sorted({p for pattern in ("*.yaml", "*.yml") for p in tmp_path.rglob(pattern) if p.is_file()})
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a.yaml",
        "b.yml",
        "deep/d.yml",
        "deep/er/c.yaml",
        "link.yaml",
        "other/e.yaml",
    ]
