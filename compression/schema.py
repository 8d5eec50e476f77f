"""The declared shape of results.json (`compress run` writes it) and baselines.json (the gate's budgets).

One pydantic model per document, strict (no "10" for 10, no true for 1), closed (an unknown key is an error: a
typo would otherwise switch a gate off silently) and finite (NaN and Infinity are refused, also as the bare
`NaN`/`Infinity` tokens Python's json module accepts). Anything malformed is a ValueError of one line:

    PATH: key 'profiles.smoke.teacher.max_size_mb': Infinity is not a finite number

Importing this module imports neither torch nor transformers, so the gate runs without them.
`compress schema results|baselines` prints the JSON Schemas.
"""

from __future__ import annotations

import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BeforeValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1

MODELS = ("teacher", "student", "pruned_student", "slim_student")
# Every variant a run reports: each fp32 model alone and quantized. Extend here (and nowhere else) to add one.
VARIANTS: tuple[str, ...] = tuple(f"{model}{suffix}" for model in MODELS for suffix in ("", "_int8", "_bnb8"))
# ... and those only a run on a GPU adds: int8 weight-only copies (compression.quant_wo8)
GPU_VARIANTS: tuple[str, ...] = tuple(f"{model}_wo8" for model in MODELS)


def known_variants() -> tuple[str, ...]:
    return (*VARIANTS, *GPU_VARIANTS)  # read at call time, so an extended VARIANTS is honoured


POOLINGS = ("cls", "mean")
BUDGET_KEYS = ("min_accuracy", "max_accuracy_drop", "max_flips", "max_size_mb", "max_latency_ratio")


def _known_variant(name: str) -> str:
    if name not in known_variants():
        raise ValueError(f"unknown variant {name!r} (known: {', '.join(known_variants())})")
    return name


VariantName = Annotated[
    str, AfterValidator(_known_variant), Field(json_schema_extra=lambda s: s.update(enum=list(known_variants())))
]
Percent = Annotated[float, Field(ge=0, le=100)]
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Count = Annotated[int, Field(ge=0, le=2**53)]  # JSON's exact integers: a float comparison cannot overflow
PerLayer = Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)]  # a count per encoder layer, >= 1
Text = Annotated[str, Field(min_length=1)]


def _not_bool_or_float(value: Any) -> Any:
    if isinstance(value, (bool, float)):  # Literal[1] takes true and 1.0, as they equal 1
        raise ValueError(f"Input should be 1, got {value!r}")
    return value


Version = Annotated[Literal[1], BeforeValidator(_not_bool_or_float)]


class _Strict(BaseModel):
    """Strict types, finite numbers, no unknown keys, immutable."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


# --- results.json ------------------------------------------------------------------------------------------


class Latency(_Strict):
    """Batch-1 latency over validation sentences, milliseconds."""

    median: Positive
    p90: Positive
    samples: Annotated[int, Field(ge=1)]

    @model_validator(mode="after")
    def _p90_not_below_median(self) -> Latency:
        if self.p90 < self.median:  # both are percentiles of the same samples
            raise ValueError(f"p90 {self.p90:g} is below the median {self.median:g}")
        return self


class VariantRow(_Strict):
    """One variant's figures: the row the pipeline writes and the report, gate and benchmarks read."""

    name: VariantName
    parameters: Annotated[int, Field(gt=0)]
    size_mb: Positive  # MiB of the saved weights
    val_accuracy: Percent  # batch 1
    flips: Count  # validation predictions that differ from the teacher's
    backend: Text
    latency_ms: Latency
    latency_ratio: Positive | None = None  # interleaved with the teacher; absent on the teacher itself
    throughput_per_s: Positive
    build_seconds: NonNegative  # 0 when loaded from the cache
    val_accuracy_batched: Percent | None = None  # length-sorted batches of 64, when it differs from batch 1
    e2e_latency_ms: Latency | None = None  # tokenize + forward at batch 1
    folder: Text | None = None  # where the variant is saved
    # What the pruning stages kept, per encoder layer (a pruned model's 8-bit variants keep its structure):
    heads_per_layer: PerLayer | None = None  # attention heads, where heads were removed
    neurons_per_layer: PerLayer | None = None  # feed-forward (intermediate) neurons, where neurons were removed
    tokens_kept: Annotated[int, Field(ge=1)] | None = None  # vocabulary tokens, where the vocabulary was pruned
    tokens_before: Annotated[int, Field(ge=1)] | None = None  # ... and how many it had before

    @model_validator(mode="after")
    def _tokens_come_in_pairs(self) -> VariantRow:
        if (self.tokens_kept is None) != (self.tokens_before is None):
            raise ValueError("tokens_kept and tokens_before come together")
        if self.tokens_kept is not None and self.tokens_kept > self.tokens_before:
            raise ValueError(f"tokens_kept {self.tokens_kept} exceeds tokens_before {self.tokens_before}")
        return self


class Environment(_Strict):
    """What the figures were measured on; other keys are kept."""

    model_config = ConfigDict(extra="allow")

    device: Text
    gpu: Text | None = None
    cpu: Text
    threads: Annotated[int, Field(ge=1)]
    python: Text
    torch: Text
    transformers: Text
    onnxruntime: Text
    bitsandbytes: Text | None = None

    @model_validator(mode="after")
    def _extras_are_json(self) -> Environment:
        for key, value in (self.model_extra or {}).items():
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError):  # NaN/Infinity would be written as null, silently
                raise ValueError(f"{key!r} must be plain finite JSON, got {value!r}") from None
        return self


class Results(_Strict):
    """results.json."""

    schema_version: Version
    profile: Text
    base: Text | None = None  # what the teacher was fine-tuned from; None when a fine-tuned teacher was given
    teacher: Text | None = None  # the fine-tuned teacher given with --teacher, used as it is
    student_base: Text | None = None  # the student's own base, or how it was cut from the teacher
    data: Text
    pooling: Literal[POOLINGS]
    environment: Environment
    stages_seconds: dict[str, NonNegative]
    total_seconds: NonNegative
    variants: list[VariantRow]

    @field_validator("variants")
    @classmethod
    def _unique_names(cls, rows: list[VariantRow]) -> list[VariantRow]:
        names = [r.name for r in rows]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"variant named more than once: {', '.join(twice)}")
        return rows

    def rows(self) -> dict[str, VariantRow]:
        """The variants by name."""
        return {r.name: r for r in self.variants}


# --- baselines.json ----------------------------------------------------------------------------------------


def _without_null(schema: dict) -> None:
    """JSON Schema of a budget: its number type only (null is refused; see Budgets._not_null)."""
    schema.update(next(s for s in schema.pop("anyOf", [schema]) if s.get("type") != "null"))
    schema.pop("default", None)


def _optional(annotation, description: str):
    """An optional budget: may be left out, but not null."""
    return Annotated[
        Union[annotation, None], Field(default=None, description=description, json_schema_extra=_without_null)
    ]


class Budgets(_Strict):
    """A variant's budgets: every key optional, at least one present."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1})

    min_accuracy: _optional(Percent, "validation accuracy floor, percent")
    max_accuracy_drop: _optional(NonNegative, "teacher accuracy minus this variant's, points")
    max_flips: _optional(Count, "validation predictions that differ from the teacher's")
    max_size_mb: _optional(Positive, "size of the saved weights, MiB")
    max_latency_ratio: _optional(Positive, "CPU batch-1 median latency over the teacher's")

    @field_validator(*BUDGET_KEYS, mode="before")
    @classmethod
    def _not_null(cls, value):
        if value is None:
            raise ValueError("a budget must be a number; leave the key out for no budget")
        return value

    @model_validator(mode="after")
    def _some_budget(self) -> Budgets:
        if not self.model_fields_set:
            raise ValueError(f"no budgets (give at least one of: {', '.join(BUDGET_KEYS)})")
        return self


def _not_empty(profile: dict) -> dict:
    if not profile:
        raise ValueError("no variants (an empty profile gates nothing)")
    return profile


class GpuBudgets(_Strict):
    """One profile's GPU latency budgets: absolute batch-1 milliseconds per GPU name, and ratios to the teacher for
    a variant that a card's entry lacks."""

    latency_ms: dict[Text, dict[VariantName, Positive]] = {}
    latency_ratio: dict[VariantName, Positive] = {}


def _gpu_per_profile(value: Any) -> Any:
    # the first layout had one GPU block for every profile: a smoke model's budget then judged a full-size one
    if isinstance(value, dict) and {"latency_ms", "latency_ratio"} & set(value):
        raise ValueError('GPU budgets are kept per profile: {"gpu": {"<profile>": {"latency_ms": ..., '
                         '"latency_ratio": ...}}}')
    return value


class Baselines(_Strict):
    """baselines.json."""

    schema_version: Version
    profiles: dict[
        Text,
        Annotated[dict[VariantName, Budgets], AfterValidator(_not_empty), Field(json_schema_extra={"minProperties": 1})],
    ]
    gpu: Annotated[dict[Text, GpuBudgets], BeforeValidator(_gpu_per_profile)] = {}  # per profile

    def gpu_of(self, profile: str) -> GpuBudgets:
        """The profile's GPU budgets (none: empty)."""
        return self.gpu.get(profile, GpuBudgets())


# --- reading and writing -----------------------------------------------------------------------------------


class _NonFinite:
    """Stands in for a NaN/Infinity token (or an overflowing literal) until its key is known."""

    def __init__(self, token: str):
        self.token = token


def _finite_float(text: str) -> float | _NonFinite:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def _first_non_finite(value: Any, loc: tuple = ()) -> tuple[tuple, str] | None:
    if isinstance(value, _NonFinite):
        return loc, value.token
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _first_non_finite(item, (*loc, key))
        if found:
            return found
    return None


def key_path(loc: tuple) -> str:
    """('variants', 0, 'latency_ms', 'median') -> 'variants[0].latency_ms.median'."""
    out = ""
    for part in loc:
        if part == "[key]":  # pydantic's marker for "the dict key itself", which is already the last part
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def one_line(message: object, limit: int | None = None) -> str:
    """`message` (an exception, say) on one line: some libraries' span several, a JSON key may hold a newline."""
    text = " ".join(str(message).split())
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    # json keeps the last of two equal keys without a word: a second "max_flips" could switch a budget off
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(f"key {key!r} appears twice in one object")
        seen[key] = value
    return seen


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from `path`; a missing or malformed file, a key twice in one object, or a NaN/Infinity
    anywhere is a ValueError."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_NonFinite, parse_float=_finite_float,
                          object_pairs_hook=_unique_keys)
    except _DuplicateKey as err:
        raise ValueError(f"{path}: {one_line(err, 200)}") from None
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder, not a JSON file") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply to be a results or baselines file") from None
    except ValueError as err:  # not JSON, not UTF-8, or an integer of more digits than Python converts
        raise ValueError(f"{path}: not valid JSON ({str(err)[:200]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    found = _first_non_finite(data)
    if found:
        loc, token = found
        raise ValueError(f"{path}: key '{key_path(loc)}': {token} is not a finite number")
    return data


def _model_at(model: type, loc: tuple) -> type | None:
    """The model class that the value at `loc` is validated as, if it is one."""
    annotation: Any = model
    for part in loc:
        while typing.get_origin(annotation) is Annotated:
            annotation = typing.get_args(annotation)[0]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(part)
            if field is None:
                return None
            annotation = field.annotation
            continue
        origin = typing.get_origin(annotation)
        if origin in (Union, types.UnionType):  # X | None: the first member that is not None
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
            origin = typing.get_origin(annotation)
        if origin in (dict, list):
            annotation = typing.get_args(annotation)[-1]
        else:
            return None
    while typing.get_origin(annotation) in (Annotated, Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def describe(err: ValidationError, model: type[BaseModel]) -> str:
    """The first error of `err` as "key 'a.b[0].c': what is wrong"."""
    first = err.errors(include_url=False)[0]
    loc, message = first["loc"], first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        owner = _model_at(model, loc[:-1])
        known = f" (known: {', '.join(owner.model_fields)})" if owner else ""
        message = f"unknown key{known}"
    elif first["type"] == "missing":
        message = "missing"
    elif first["type"] in ("dict_type", "model_type", "model_attributes_type"):
        message = f"should be an object, got {first['input']!r}"
    elif first["type"] == "list_type":
        message = f"should be a list, got {first['input']!r}"
    elif first["type"] not in ("value_error", "assertion_error"):
        shown = repr(first["input"])
        message += f", got {shown if len(shown) <= 60 else shown[:40] + f'... ({len(shown)} characters)'}"
    return f"key '{key_path(loc) or '(top level)'}': {message}"


def parse(model: type[BaseModel], data: Any, source: str | os.PathLike):
    """`data` validated as `model`; a ValueError "SOURCE: key '...': ..." on the first thing wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ValueError(f"{source}: {describe(err, model)}") from None


def read_results(path: str | os.PathLike) -> Results:
    """results.json, validated."""
    return parse(Results, read_json(path), path)


def read_baselines(path: str | os.PathLike) -> Baselines:
    """baselines.json, validated."""
    return parse(Baselines, read_json(path), path)


def dumps(document: BaseModel) -> str:
    """Strict JSON (no NaN/Infinity), indented; budgets left out stay out."""
    return json.dumps(document.model_dump(mode="json", exclude_none=isinstance(document, Baselines)),
                      indent=2, allow_nan=False) + "\n"


SCHEMAS: dict[str, type[BaseModel]] = {"results": Results, "baselines": Baselines}


def json_schema(document: str) -> dict:
    """The published JSON Schema of "results" or "baselines"."""
    return SCHEMAS[document].model_json_schema()
