"""Users' video briefs: YAML files in a folder, loaded into validated generation requests.

No Dagster import: the Dagster layer, the CLI and the tests all read briefs through here. Every
brief is checked with `rivya.generation` before anything is uploaded or paid for, and every problem
in the folder is reported at once, one line each (file, brief, field, rule), so a user fixes a
folder in one pass instead of one error per run.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .rivya.errors import RequestValidationError
from .rivya.generation import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    GenerationRequest,
    normalize_params,
    validate_prompt,
)
from .rivya.models import ModelInfo

REQUESTS_PATH_ENV = "RIVYA_REQUESTS_PATH"
BRIEF_PATTERNS = ("*.yaml", "*.yml")
ALLOWED_KEYS = ("id", "prompt", "params", "references", "model", "regenerate")
MAX_ID_LENGTH = 64
ID_SLUG = re.compile(r"[a-z0-9][a-z0-9_-]*")
# Reference media is given as file paths; the pipeline uploads them and fills this param itself.
RESERVED_PARAMS = ("referenceMediaItems",)


class BriefError(ValueError):
    """One problem with one brief (or with a whole file when `brief_id` and `index` are None).

    Reads as one line: "<file>: brief '<id>': <field>: <rule>", or "brief #N" (N counting from 1)
    when the brief has no usable id.
    """

    def __init__(
        self, file: Path, field: str, rule: str, *, brief_id: str | None = None, index: int | None = None
    ) -> None:
        self.file = file
        self.brief_id = brief_id
        self.index = index
        self.field = field
        self.rule = rule.replace("\n", " ")
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.brief_id is not None:
            where = f"{self.file}: brief '{self.brief_id}'"
        elif self.index is not None:
            where = f"{self.file}: brief #{self.index + 1}"
        else:
            where = str(self.file)
        return f"{where}: {self.field}: {self.rule}"


class BriefNotFound(BriefError, KeyError):
    """The asked-for id is in no brief of the folder (a partition whose brief was deleted, say)."""


class BriefErrors(ValueError):
    """Every problem found in a folder of briefs; str() is one line per problem."""

    def __init__(self, errors: list[BriefError]) -> None:
        self.errors = errors
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


@dataclass(frozen=True)
class Brief:
    """One validated brief. `index` is its 0-based position in `source` (0 for a single-brief file)."""

    id: str
    source: Path
    index: int
    model: str
    prompt: str
    params: dict[str, Any]
    references: tuple[Path, ...]
    regenerate: int
    request: GenerationRequest

    @property
    def content_hash(self) -> str:
        """What was asked, not how it was written: the request's idempotency key.

        It covers model, prompt, normalized params, the references' bytes and `regenerate`, so
        comments, key order and `duration: 5` vs `duration: "5"` do not change it.
        """
        return self.request.idempotency_key()


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
    reader = _FolderReader(folder, {**BUILTIN_MODELS, **(model_specs or {})})
    files = sorted({path for pattern in BRIEF_PATTERNS for path in folder.rglob(pattern) if path.is_file()})
    for path in files:
        reader.read_file(path)
    return reader.briefs, reader.errors


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


class _FolderReader:
    """Reads files one by one, keeping what passed, what failed, and which file first used each id."""

    def __init__(self, folder: Path, catalog: Mapping[str, ModelInfo]) -> None:
        self.root = folder.resolve()
        self.catalog = catalog
        self.briefs: list[Brief] = []
        self.errors: list[BriefError] = []
        self.first_use: dict[str, tuple[Path, int]] = {}

    def read_file(self, path: Path) -> None:
        try:
            entries = _file_entries(path)
        except BriefError as error:
            self.errors.append(error)
            return
        for index, entry in enumerate(entries):
            _BriefReader(self, path, index, entry).read()


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
            raise BriefError(path, "requests", f"must be a list of briefs, got {_kind(data['requests'])}")
        return data["requests"]
    if isinstance(data, dict):
        return [data]
    raise BriefError(
        path, "top level", f"must be one brief (a mapping) or a list of briefs under `requests:`, got {_kind(data)}"
    )


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


class _BriefReader:
    """Checks one raw brief, collecting every problem it has rather than stopping at the first."""

    def __init__(self, folder: _FolderReader, path: Path, index: int, entry: Any) -> None:
        self.folder = folder
        self.path = path
        self.index = index
        self.entry = entry
        self.brief_id: str | None = None
        self.errors: list[BriefError] = []

    def refuse(self, field: str, rule: str) -> None:
        self.errors.append(BriefError(self.path, field, rule, brief_id=self.brief_id, index=self.index))

    def read(self) -> None:
        if not isinstance(self.entry, dict):
            self.refuse("brief", f"must be a mapping with keys {', '.join(ALLOWED_KEYS)}, got {_kind(self.entry)}")
        else:
            self.brief_id = self.read_id()
            if self.brief_id is not None:
                self.claim_id()
            brief = self.read_fields()
            if brief is not None and not self.errors:
                self.folder.briefs.append(brief)
        self.folder.errors.extend(self.errors)

    def read_id(self) -> str | None:
        """A valid id labels every later message about this brief."""
        if self.entry.get("id") is None:
            self.refuse("id", "is required")
            return None
        brief_id = self.entry["id"]
        if not isinstance(brief_id, str):
            self.refuse("id", f"must be text, got {_kind(brief_id)} {brief_id!r}")
            return None
        if len(brief_id) > MAX_ID_LENGTH:
            self.refuse("id", f"is {len(brief_id)} characters, at most {MAX_ID_LENGTH} allowed")
            return None
        if not ID_SLUG.fullmatch(brief_id):
            self.refuse(
                "id",
                f"{brief_id!r} is not a slug: use lowercase letters, digits, '-' and '_', "
                "starting with a letter or digit",
            )
            return None
        return brief_id

    def claim_id(self) -> None:
        """Ids name partitions and stored videos, so one id may appear once in the whole folder."""
        first = self.folder.first_use.setdefault(self.brief_id, (self.path, self.index))
        if first != (self.path, self.index):
            first_path, first_index = first
            self.refuse(
                "id",
                f"duplicate: brief #{self.index + 1} here reuses the id of brief #{first_index + 1} in {first_path}",
            )

    def read_fields(self) -> Brief | None:
        for key in self.entry:
            if key not in ALLOWED_KEYS:
                self.refuse(str(key), f"unknown key (allowed: {', '.join(ALLOWED_KEYS)})")
        spec = self.read_model()
        regenerate = self.read_regenerate()
        prompt = self.entry.get("prompt")
        params = self.read_params()
        references = self.read_references()
        if prompt is None:
            self.refuse("prompt", "is required")
        elif spec is not None:
            self.check(validate_prompt, spec, prompt)
        if spec is not None and params is not None:
            self.check(normalize_params, spec, {k: v for k, v in params.items() if k not in RESERVED_PARAMS})
        if spec is None or params is None or references is None or regenerate is None:
            return None
        request = self.check(
            GenerationRequest.build,
            prompt=prompt,
            params=params,
            reference_paths=references,
            spec=spec,
            regenerate=regenerate,
        )
        if request is None or self.brief_id is None:
            return None
        return Brief(
            id=self.brief_id,
            source=self.path,
            index=self.index,
            model=spec.id,
            prompt=request.prompt,
            params=params,
            references=references,
            regenerate=regenerate,
            request=request,
        )

    def check(self, validate: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one of rivya.generation's checks; a field already refused here is not reported twice."""
        try:
            return validate(*args, **kwargs)
        except RequestValidationError as error:
            if error.field not in {e.field for e in self.errors}:
                self.refuse(error.field, error.rule)
            return None

    def read_model(self) -> ModelInfo | None:
        model = self.entry.get("model", DEFAULT_MODEL)
        if isinstance(model, str) and model in self.folder.catalog:
            return self.folder.catalog[model]
        known = ", ".join(sorted(self.folder.catalog))
        self.refuse("model", f"unknown model {model!r} (known: {known})")
        return None

    def read_regenerate(self) -> int | None:
        regenerate = self.entry.get("regenerate", 0)
        if isinstance(regenerate, bool) or not isinstance(regenerate, int) or regenerate < 0:
            self.refuse("regenerate", f"must be a whole number >= 0, got {regenerate!r}")
            return None
        return regenerate

    def read_params(self) -> dict[str, Any] | None:
        params = self.entry.get("params")
        if params is None:
            return {}
        if not isinstance(params, dict):
            self.refuse("params", f"must be a mapping of parameter: value, got {_kind(params)}")
            return None
        for key in RESERVED_PARAMS:
            if key in params:
                self.refuse(f"params.{key}", "not allowed: list reference image files under `references:` instead")
        return params

    def read_references(self) -> tuple[Path, ...] | None:
        """Paths relative to the brief's file, resolved, and kept inside the briefs folder."""
        references = self.entry.get("references")
        if references is None:
            return ()
        if not isinstance(references, list):
            self.refuse("references", f"must be a list of image paths, got {_kind(references)}")
            return None
        resolved = [self.resolve_reference(f"references[{i}]", ref) for i, ref in enumerate(references)]
        if None in resolved:
            return None
        return tuple(resolved)

    def resolve_reference(self, field: str, reference: Any) -> Path | None:
        if not isinstance(reference, str) or not reference.strip():
            self.refuse(field, f"must be an image path, got {reference!r}")
            return None
        if Path(reference).is_absolute():
            self.refuse(field, f"absolute path {reference!r} refused: give a path relative to this file")
            return None
        path = (self.path.parent / reference).resolve()
        if not path.is_relative_to(self.folder.root):
            self.refuse(field, f"{reference!r} is outside the requests folder {self.folder.root}")
            return None
        return path
