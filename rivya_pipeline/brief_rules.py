"""What one brief may say: its fields, the id rule, and the checks that turn one raw mapping into a `Brief`.

No Dagster import. Every field is checked with `rivya.generation` before anything is uploaded or paid for,
and every problem of a brief is collected (file, brief, field, rule) rather than stopping at the first.
The folder around the briefs (files, YAML, duplicates across files, lookups) is `briefs.py`'s concern.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from .rivya.errors import RequestValidationError
from .rivya.generation import DEFAULT_MODEL, GenerationRequest, normalize_params, validate_prompt
from .rivya.models import ModelInfo

ALLOWED_KEYS = ("id", "prompt", "params", "references", "model", "regenerate")
MAX_ID_LENGTH = 64
# Ids name partitions and S3 keys (`storage` checks its keys with this same rule).
BRIEF_ID = re.compile(rf"[a-z0-9][a-z0-9_-]{{0,{MAX_ID_LENGTH - 1}}}")
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

    @cached_property  # a brief is frozen; discovery asks for the version of each brief of the folder every tick
    def content_hash(self) -> str:
        """What was asked, not how it was written: the request's idempotency key.

        It covers model, prompt, normalized params, the references' bytes and `regenerate`, so
        comments, key order and `duration: 5` vs `duration: "5"` do not change it.
        """
        return self.request.idempotency_key()


@dataclass
class FolderContext:
    """What checking a brief needs from the folder it sits in. `references_resolved` collects every reference path
    a check resolved, found or not: a reading of a file stays true while those files stay as they were."""

    root: Path
    catalog: Mapping[str, ModelInfo]
    references_resolved: list[Path] = dataclasses.field(default_factory=list)


def kind_of(value: Any) -> str:
    """How a value that has the wrong type is named in a rule."""
    return "nothing" if value is None else type(value).__name__


def check_brief(
    context: FolderContext, path: Path, index: int, entry: Any
) -> tuple[Brief | None, list[BriefError], str | None]:
    """The brief at `index` of the file `path`, or None; every problem it has; and its id when that is valid (ids
    are unique across the folder, which the folder's reading checks: see briefs.py)."""
    checker = _BriefChecker(context, path, index, entry)
    brief = checker.check()
    return (brief if not checker.errors else None), checker.errors, checker.brief_id


class _BriefChecker:
    """Checks one raw brief, collecting every problem it has rather than stopping at the first."""

    def __init__(self, context: FolderContext, path: Path, index: int, entry: Any) -> None:
        self.context = context
        self.path = path
        self.index = index
        self.entry = entry
        self.brief_id: str | None = None
        self.errors: list[BriefError] = []

    def refuse(self, field: str, rule: str) -> None:
        self.errors.append(BriefError(self.path, field, rule, brief_id=self.brief_id, index=self.index))

    def check(self) -> Brief | None:
        if not isinstance(self.entry, dict):
            self.refuse("brief", f"must be a mapping with keys {', '.join(ALLOWED_KEYS)}, got {kind_of(self.entry)}")
            return None
        self.brief_id = self.read_id()
        return self.read_fields()

    def read_id(self) -> str | None:
        """A valid id labels every later message about this brief."""
        if self.entry.get("id") is None:
            self.refuse("id", "is required")
            return None
        brief_id = self.entry["id"]
        if not isinstance(brief_id, str):
            self.refuse("id", f"must be text, got {kind_of(brief_id)} {brief_id!r}")
            return None
        if len(brief_id) > MAX_ID_LENGTH:
            self.refuse("id", f"is {len(brief_id)} characters, at most {MAX_ID_LENGTH} allowed")
            return None
        if not BRIEF_ID.fullmatch(brief_id):
            self.refuse(
                "id",
                f"{brief_id!r} is not a slug: use lowercase letters, digits, '-' and '_', "
                "starting with a letter or digit",
            )
            return None
        return brief_id

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
            self.check_with(validate_prompt, spec, prompt)
        if spec is not None and params is not None:
            self.check_with(normalize_params, spec, {k: v for k, v in params.items() if k not in RESERVED_PARAMS})
        if spec is None or params is None or references is None or regenerate is None:
            return None
        request = self.check_with(
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

    def check_with(self, validate: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one of rivya.generation's checks; a field already refused here is not reported twice."""
        try:
            return validate(*args, **kwargs)
        except RequestValidationError as error:
            if error.field not in {e.field for e in self.errors}:
                self.refuse(error.field, error.rule)
            return None

    def read_model(self) -> ModelInfo | None:
        model = self.entry.get("model", DEFAULT_MODEL)
        if isinstance(model, str) and model in self.context.catalog:
            return self.context.catalog[model]
        known = ", ".join(sorted(self.context.catalog))
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
            self.refuse("params", f"must be a mapping of parameter: value, got {kind_of(params)}")
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
            self.refuse("references", f"must be a list of image paths, got {kind_of(references)}")
            return None
        resolved = [self.resolve_reference(f"references[{i}]", ref) for i, ref in enumerate(references)]
        paths = tuple(path for path in resolved if path is not None)
        return paths if len(paths) == len(resolved) else None

    def resolve_reference(self, field: str, reference: Any) -> Path | None:
        if not isinstance(reference, str) or not reference.strip():
            self.refuse(field, f"must be an image path, got {reference!r}")
            return None
        if Path(reference).is_absolute():
            self.refuse(field, f"absolute path {reference!r} refused: give a path relative to this file")
            return None
        path = (self.path.parent / reference).resolve()
        self.context.references_resolved.append(path)
        if not path.is_relative_to(self.context.root):
            self.refuse(field, f"{reference!r} is outside the requests folder {self.context.root}")
            return None
        return path
