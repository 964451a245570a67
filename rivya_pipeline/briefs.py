"""Users' video briefs: YAML files in a folder, loaded into validated generation requests.

No Dagster import: the Dagster layer, the CLI and the tests all read briefs through here. Every
problem in the folder is reported at once, one line each (file, brief, field, rule), so a user fixes a
folder in one pass instead of one error per run. What one brief may say is `brief_rules`; this module
is the folder: its files, their YAML, ids unique across them, and lookups by id.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .brief_rules import Brief, BriefError, FolderContext, check_brief, kind_of
from .rivya.generation import BUILTIN_MODELS, FileSignature, file_signature
from .rivya.models import ModelInfo
from .settings import REQUESTS_PATH_ENV

__all__ = ["Brief", "BriefError", "BriefErrors", "BriefNotFound", "load_brief_by_id", "load_briefs", "scan_briefs"]

BRIEF_SUFFIXES = (".yaml", ".yml")


class BriefNotFound(BriefError, KeyError):
    """The asked-for id is in no brief of the folder (a partition whose brief was deleted, say)."""


class BriefErrors(ValueError):
    """Every problem found in a folder of briefs; str() is one line per problem."""

    def __init__(self, errors: list[BriefError]) -> None:
        self.errors = errors
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


# libyaml's parser where PyYAML was built with it (the wheels are): it parses a brief about ten times faster.
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _BriefLoader(_SafeLoader):
    """YAML 1.1 reads `16:9` as the base-60 number 969; in a brief it always means the text."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> Any:
        return node.value if ":" in node.value else super().construct_yaml_int(node)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> Any:
        return node.value if ":" in node.value else super().construct_yaml_float(node)


_BriefLoader.add_constructor("tag:yaml.org,2002:int", _BriefLoader.construct_yaml_int)
_BriefLoader.add_constructor("tag:yaml.org,2002:float", _BriefLoader.construct_yaml_float)


def load_briefs(folder: Path, *, model_specs: Mapping[str, ModelInfo] | None = None) -> list[Brief]:
    """Every brief under `folder`, in file order; raises BriefErrors listing all problems (no partial result).

    `model_specs` is the catalog (GET /models) that lets briefs use models other than the built-in
    kling-3-0; an entry there overrides the built-in one.
    """
    briefs, errors = _read_folder(Path(folder), model_specs)
    if errors:
        raise BriefErrors(errors)
    return briefs


def scan_briefs(
    folder: Path, *, model_specs: Mapping[str, ModelInfo] | None = None
) -> tuple[list[Brief], list[BriefError]]:
    """The valid briefs and the problems of the others: the scheduled discovery goes on with the good ones."""
    return _read_folder(Path(folder), model_specs)


def load_brief_by_id(
    folder: Path,
    brief_id: str,
    *,
    model_specs: Mapping[str, ModelInfo] | None = None,
    source: Path | None = None,
) -> Brief:
    """The brief with `brief_id`, even when *other* briefs in the folder are broken.

    One user's typo must not stop every other brief's run, so only problems that concern this id
    (its own fields, a duplicate of it) are raised. When the id is nowhere to be found and some files
    could not be read, those problems are raised, since the brief may sit in one of them.

    `source` is where the brief was last seen (the index discovery keeps): when that file still holds a valid brief
    with this id, only that file is read. Otherwise, the whole folder.
    """
    folder = Path(folder)
    root = folder.resolve()
    if source is not None and source.resolve().is_relative_to(root) and source.suffix in (".yaml", ".yml"):
        context = FolderContext(root=root, catalog={**BUILTIN_MODELS, **(model_specs or {})})
        reading = _read_file(context, source, remember=model_specs is None)
        for entry in reading.entries:
            if entry.brief_id == brief_id and entry.brief is not None:
                return entry.brief
    briefs, errors = _read_folder(folder, model_specs)
    own_errors = [e for e in errors if e.brief_id == brief_id]
    if own_errors:
        raise BriefErrors(own_errors)
    found = next((b for b in briefs if b.id == brief_id), None)
    if found is not None:
        return found
    not_found = BriefNotFound(folder, "id", "no brief with this id in the folder", brief_id=brief_id)
    if errors:
        raise BriefErrors([*errors, not_found])
    raise not_found


@dataclass(frozen=True)
class _EntryReading:
    """One raw brief of a file, checked: the brief or None, its problems, and its id when that is valid."""

    brief: Brief | None
    errors: tuple[BriefError, ...]
    brief_id: str | None


@dataclass(frozen=True)
class _FileReading:
    """One brief file as checked, with what the check depended on: the file's bytes and its references' state."""

    text: bytes
    references: tuple[tuple[Path, FileSignature | None], ...]
    entries: tuple[_EntryReading, ...] = ()
    error: BriefError | None = None

    def still_true(self, text: bytes) -> bool:
        return text == self.text and all(file_signature(path) == seen for path, seen in self.references)


# The last reading of every brief file, by folder then path (built-in catalog only): a file is parsed and checked
# again only when its bytes or one of its references changed, so an unchanged folder costs a read of its files.
_readings: dict[Path, dict[Path, _FileReading]] = {}


def _brief_files(folder: Path) -> list[Path]:
    """The brief files under `folder`, sorted, as `rglob('*.yaml')` and `rglob('*.yml')` find them (symlinked
    folders not entered, unreadable ones skipped), in one walk: the entries' types need no stat of each file."""
    found: list[Path] = []
    pending = [os.fspath(folder)]
    while pending:
        try:
            entries = os.scandir(pending.pop())
        except PermissionError:
            continue
        with entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif entry.name.endswith(BRIEF_SUFFIXES) and entry.is_file():
                    found.append(Path(entry.path))
    return sorted(found)


def _read_folder(folder: Path, model_specs: Mapping[str, ModelInfo] | None) -> tuple[list[Brief], list[BriefError]]:
    if not folder.is_dir():
        return [], [BriefError(folder, "folder", f"not a folder (set {REQUESTS_PATH_ENV} to the briefs folder)")]
    context = FolderContext(root=folder.resolve(), catalog={**BUILTIN_MODELS, **(model_specs or {})})
    remember = model_specs is None
    readings = {path: _read_file(context, path, remember=remember) for path in _brief_files(folder)}
    if remember:
        _readings[context.root] = readings  # files that left the folder leave the memory too
    briefs: list[Brief] = []
    errors: list[BriefError] = []
    first_use: dict[str, tuple[Path, int]] = {}
    for path, reading in readings.items():
        if reading.error is not None:
            errors.append(reading.error)
        for index, entry in enumerate(reading.entries):
            problems, brief = list(entry.errors), entry.brief
            if entry.brief_id is not None:
                # Ids name partitions and stored videos, so one id may appear once in the whole folder.
                first_path, first_index = first_use.setdefault(entry.brief_id, (path, index))
                if (first_path, first_index) != (path, index):
                    rule = (
                        f"duplicate: brief #{index + 1} here reuses the id of brief #{first_index + 1} in {first_path}"
                    )
                    problems.insert(0, BriefError(path, "id", rule, brief_id=entry.brief_id, index=index))
                    brief = None
            if brief is not None:
                briefs.append(brief)
            errors += problems
    return briefs, errors


def _read_file(context: FolderContext, path: Path, *, remember: bool) -> _FileReading:
    """The reading of one brief file: the remembered one while it is still true, else a fresh one."""
    try:
        text = path.read_bytes()
    except OSError as error:
        return _FileReading(b"", (), error=BriefError(path, "file", f"cannot be read ({error.strerror})"))
    last = _readings.get(context.root, {}).get(path) if remember else None
    if last is not None and last.still_true(text):
        return last
    resolved_before = len(context.references_resolved)
    try:
        raw_entries = _file_entries(path, text)
    except BriefError as error:
        return _FileReading(text, (), error=error)
    entries = []
    for index, raw in enumerate(raw_entries):
        brief, problems, brief_id = check_brief(context, path, index, raw)
        entries.append(_EntryReading(brief, tuple(problems), brief_id))
    references = tuple((ref, file_signature(ref)) for ref in context.references_resolved[resolved_before:])
    reading = _FileReading(text, references, tuple(entries))
    if remember:
        _readings.setdefault(context.root, {})[path] = reading
    return reading


def _file_entries(path: Path, text: bytes) -> list[Any]:
    """The raw briefs of one file (its bytes): its single mapping, or its `requests:` list."""
    try:
        # _BriefLoader is a SafeLoader: no arbitrary objects.
        data = yaml.load(text.decode("utf-8"), Loader=_BriefLoader)  # noqa: S506
    except UnicodeDecodeError as error:
        raise BriefError(path, "file", f"not UTF-8 text ({error.reason} at byte {error.start})") from error
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise BriefError(path, "yaml", f"syntax error{where}: {error.problem or error.context}") from error
    except yaml.YAMLError as error:
        raise BriefError(path, "yaml", f"not valid YAML: {error}") from error
    if isinstance(data, dict) and "requests" in data:
        others = sorted(str(k) for k in data if k != "requests")
        if others:
            raise BriefError(
                path, "top level", f"a file with `requests:` holds nothing else (found: {', '.join(others)})"
            )
        if not isinstance(data["requests"], list):
            raise BriefError(path, "requests", f"must be a list of briefs, got {kind_of(data['requests'])}")
        return data["requests"]
    if isinstance(data, dict):
        return [data]
    raise BriefError(
        path, "top level", f"must be one brief (a mapping) or a list of briefs under `requests:`, got {kind_of(data)}"
    )
