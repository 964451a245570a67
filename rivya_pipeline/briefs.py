"""Users' video briefs: YAML files in a folder, loaded into validated generation requests.

No Dagster import: the Dagster layer, the CLI and the tests all read briefs through here. Every
problem in the folder is reported at once, one line each (file, brief, field, rule), so a user fixes a
folder in one pass instead of one error per run. What one brief may say is `brief_rules`; this module
is the folder: its files, their YAML, ids unique across them, and lookups by id.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .brief_rules import Brief, BriefError, FolderContext, check_brief, kind_of
from .rivya.generation import BUILTIN_MODELS
from .rivya.models import ModelInfo
from .settings import REQUESTS_PATH_ENV

__all__ = ["Brief", "BriefError", "BriefErrors", "BriefNotFound", "load_brief_by_id", "load_briefs", "scan_briefs"]

BRIEF_PATTERNS = ("*.yaml", "*.yml")


class BriefNotFound(BriefError, KeyError):
    """The asked-for id is in no brief of the folder (a partition whose brief was deleted, say)."""


class BriefErrors(ValueError):
    """Every problem found in a folder of briefs; str() is one line per problem."""

    def __init__(self, errors: list[BriefError]) -> None:
        self.errors = errors
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


class _BriefLoader(yaml.SafeLoader):
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


def load_brief_by_id(folder: Path, brief_id: str, *, model_specs: Mapping[str, ModelInfo] | None = None) -> Brief:
    """The brief with `brief_id`, even when *other* briefs in the folder are broken.

    One user's typo must not stop every other brief's run, so only problems that concern this id
    (its own fields, a duplicate of it) are raised. When the id is nowhere to be found and some files
    could not be read, those problems are raised, since the brief may sit in one of them.
    """
    folder = Path(folder)
    briefs, errors = _read_folder(folder, model_specs) if model_specs else _read_folder_cached(folder)
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


def _read_folder(folder: Path, model_specs: Mapping[str, ModelInfo] | None) -> tuple[list[Brief], list[BriefError]]:
    if not folder.is_dir():
        return [], [BriefError(folder, "folder", f"not a folder (set {REQUESTS_PATH_ENV} to the briefs folder)")]
    context = FolderContext(root=folder.resolve(), catalog={**BUILTIN_MODELS, **(model_specs or {})})
    briefs: list[Brief] = []
    errors: list[BriefError] = []
    for path in sorted({path for pattern in BRIEF_PATTERNS for path in folder.rglob(pattern) if path.is_file()}):
        try:
            entries = _file_entries(path)
        except BriefError as error:
            errors.append(error)
            continue
        for index, entry in enumerate(entries):
            brief, problems = check_brief(context, path, index, entry)
            if brief is not None:
                briefs.append(brief)
            errors += problems
    return briefs, errors


# The last reading of each folder, with the state it was read in (see _folder_state).
_last_reading: dict[Path, tuple[tuple[Any, ...], tuple[list[Brief], list[BriefError]]]] = {}


def _folder_state(folder: Path) -> tuple[Any, ...]:
    """What a reading of `folder` depends on: every brief file's bytes, and the size and modification time of
    every other file (the reference images, which can only live inside the folder)."""
    state = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix in (".yaml", ".yml"):
            state.append((path, path.read_bytes()))
        else:
            stat = path.stat()
            state.append((path, stat.st_size, stat.st_mtime_ns))
    return tuple(state)


def _read_folder_cached(folder: Path) -> tuple[list[Brief], list[BriefError]]:
    """`_read_folder` with the built-in catalog, read again only when the folder changed.

    Every run of a brief's partition looks its brief up by id, and a lookup has to read the whole folder
    (ids are unique across it): without this, N briefs cost N full readings, quadratic in YAML parsing.
    """
    if not folder.is_dir():
        return _read_folder(folder, None)
    state = _folder_state(folder)
    last = _last_reading.get(folder)
    if last is not None and last[0] == state:
        return last[1]
    reading = _read_folder(folder, None)
    _last_reading[folder] = (state, reading)
    return reading


def _file_entries(path: Path) -> list[Any]:
    """The raw briefs of one file: its single mapping, or its `requests:` list."""
    try:
        # _BriefLoader is a SafeLoader: no arbitrary objects.
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_BriefLoader)  # noqa: S506
    except UnicodeDecodeError as error:
        raise BriefError(path, "file", f"not UTF-8 text ({error.reason} at byte {error.start})") from error
    except OSError as error:
        raise BriefError(path, "file", f"cannot be read ({error.strerror})") from error
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
