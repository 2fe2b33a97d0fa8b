"""Which LAION rows each SD v1 training stage used, as typed filter rules.

One definition serves two places: `data.filter` applies it to LAION's parquet metadata before
anything is downloaded (vectorised, with pyarrow), and the loader applies it per sample to shards
that were downloaded without filtering (`SubsetFilter.failed_rules` on the sample's json). Both
follow the same conventions, so a row kept by one is kept by the other:

- thresholds are inclusive unless the model card says otherwise: min_width/min_height/
  min_similarity/min/max_caption_length compare with >= / <=; min_aesthetic is strictly greater
  ("aesthetics score > 5.0") and max_pwatermark/max_punsafe strictly less ("< 0.5");
- a null or NaN value fails the rule that reads it (the row cannot be shown to satisfy it): a row
  without an aesthetic score fails min_aesthetic. A column that is absent altogether is an error,
  not a failure, so a misnamed column cannot silently empty a dataset;
- caption length is counted in unicode code points, before any clean-up.

The presets follow the SD v1 model card:
- `laion2b-en`: v1-1's 256 px phase, every row of laion2B-en;
- `laion-high-resolution`: v1-1's 512 px phase, LAION-5B rows with an original size >= 1024x1024;
- `laion-improved-aesthetics`: v1-2 and v1-3 ("laion-aesthetics v2 5+"), laion2B-en rows with an
  original size >= 512x512, predicted aesthetic score > 5.0 and predicted watermark probability < 0.5.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any


@dataclass(frozen=True)
class MetadataColumns:
    """Column names of the metadata. The defaults are laion2B-en's parquet; the aesthetics subsets
    name their score `aesthetic` (laion-aesthetics v2 5+) or `AESTHETIC_SCORE` (6+ and some mirrors); the
    metadata filter and the loader's per-sample filter read either (COLUMN_ALIASES)."""

    url: str = "URL"
    caption: str = "TEXT"
    width: str = "WIDTH"
    height: str = "HEIGHT"
    similarity: str = "similarity"
    punsafe: str = "punsafe"
    pwatermark: str = "pwatermark"
    aesthetic: str = "aesthetic"
    # Only the multilingual parts of LAION-5B have it; laion2B-en is English by construction.
    language: str = "LANGUAGE"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"columns.{f.name}={value!r}: must be a non-empty column name")

    @classmethod
    def img2dataset_json(cls, **overrides: str) -> "MetadataColumns":
        """Names in the per-sample json that img2dataset writes: it renames the URL and caption
        columns to `url`/`caption` and records the size it actually decoded as original_width/
        original_height (metadata WIDTH/HEIGHT are only there if saved, and are sometimes wrong)."""
        return replace(cls(url="url", caption="caption", width="original_width", height="original_height"),
                       **overrides)


# Names that stand for the same value: metadata (a parquet file, a sample's json) that lacks the filter's
# column but has one of the others is read under that one.
COLUMN_ALIASES: tuple[tuple[str, ...], ...] = (("aesthetic", "AESTHETIC_SCORE"),)


def alias_in(column: str, present) -> str | None:
    """The other name of `column` that `present` (names, or a mapping) has, if any."""
    for group in COLUMN_ALIASES:
        if column in group:
            return next((name for name in group if name != column and name in present), None)
    return None


# Rule name -> the MetadataColumns field it reads. The names are the SubsetFilter field names, so a
# report's per-rule counts point at the setting that caused them.
RULE_COLUMNS: dict[str, str] = {
    "min_width": "width",
    "min_height": "height",
    "min_aesthetic": "aesthetic",
    "max_pwatermark": "pwatermark",
    "max_punsafe": "punsafe",
    "min_caption_length": "caption",
    "max_caption_length": "caption",
    "languages": "language",
    "min_similarity": "similarity",
}


@dataclass(frozen=True)
class SubsetFilter:
    """Rules a metadata row must pass; a rule left at None is off."""

    min_width: int | None = None  # original width >= this
    min_height: int | None = None  # original height >= this
    min_aesthetic: float | None = None  # predicted aesthetic score > this (strictly)
    max_pwatermark: float | None = None  # predicted watermark probability < this (strictly)
    max_punsafe: float | None = None  # predicted NSFW probability < this (strictly)
    min_caption_length: int | None = None  # caption length in code points >= this
    max_caption_length: int | None = None  # caption length in code points <= this
    languages: tuple[str, ...] | None = None  # LANGUAGE is one of these (exact match)
    min_similarity: float | None = None  # CLIP image-text cosine similarity >= this
    columns: MetadataColumns = field(default_factory=MetadataColumns)

    def __post_init__(self) -> None:
        for name in ("min_width", "min_height", "min_caption_length", "max_caption_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}={value!r}: must be a non-negative integer or None (off)")
        for name in ("max_pwatermark", "max_punsafe"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name}={value!r}: a probability bound must be in (0, 1] (rows pass when "
                                 f"their value is strictly below it); use None to turn the rule off")
        if self.min_similarity is not None and not -1.0 <= self.min_similarity <= 1.0:
            raise ValueError(f"min_similarity={self.min_similarity!r}: a cosine similarity is in [-1, 1]")
        if self.min_aesthetic is not None and not math.isfinite(self.min_aesthetic):
            raise ValueError(f"min_aesthetic={self.min_aesthetic!r}: must be a finite score (LAION's are 1..10)")
        if (self.min_caption_length is not None and self.max_caption_length is not None
                and self.min_caption_length > self.max_caption_length):
            raise ValueError(f"min_caption_length={self.min_caption_length} > max_caption_length="
                             f"{self.max_caption_length}: no caption could pass")
        if self.languages is not None:
            if isinstance(self.languages, str):
                raise ValueError(f"languages={self.languages!r}: pass a tuple of codes, e.g. ('en',)")
            langs = tuple(self.languages)
            if not langs or not all(isinstance(code, str) and code for code in langs):
                raise ValueError(f"languages={self.languages!r}: must be a non-empty tuple of language codes "
                                 "or None (off)")
            object.__setattr__(self, "languages", langs)
        if not isinstance(self.columns, MetadataColumns):
            raise ValueError(f"columns={self.columns!r}: must be a MetadataColumns")

    def active_rules(self) -> list[str]:
        """Names of the rules that are on, in a fixed order."""
        return [name for name in RULE_COLUMNS if getattr(self, name) is not None]

    def column(self, rule: str) -> str:
        return getattr(self.columns, RULE_COLUMNS[rule])

    def required_columns(self) -> list[str]:
        """Metadata columns the active rules read (each once)."""
        return list(dict.fromkeys(self.column(rule) for rule in self.active_rules()))

    def with_columns(self, columns: MetadataColumns) -> "SubsetFilter":
        return replace(self, columns=columns)

    def failed_rules(self, meta: Mapping[str, Any]) -> list[str]:
        """The active rules one metadata dict (a parquet row, or a sample's json) fails; [] = keep."""
        missing = [c for c in self.required_columns() if c not in meta]
        if missing:
            raise KeyError(f"metadata has no {missing} (it has {sorted(meta)}); set the matching "
                           f"SubsetFilter.columns field, or save those columns when downloading")
        return [rule for rule in self.active_rules() if not self._passes(rule, meta[self.column(rule)])]

    def accepts(self, meta: Mapping[str, Any]) -> bool:
        return not self.failed_rules(meta)

    def _passes(self, rule: str, value: Any) -> bool:
        if value is None:
            return False
        bound = getattr(self, rule)
        if rule == "languages":
            return value in bound
        if rule in ("min_caption_length", "max_caption_length"):
            if not isinstance(value, str):
                return False
            return len(value) >= bound if rule == "min_caption_length" else len(value) <= bound
        try:
            number = float(value)
        except (TypeError, ValueError):
            return False
        # NaN compares False with everything, so it fails every numeric rule, as in pyarrow.
        if rule in ("min_width", "min_height", "min_similarity"):
            return number >= bound
        if rule == "min_aesthetic":
            return number > bound
        return number < bound  # max_pwatermark, max_punsafe

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["languages"] is not None:
            out["languages"] = list(out["languages"])
        return out


@dataclass(frozen=True)
class Stage:
    """A named LAION subset and the resolution SD v1 trained on it."""

    name: str
    image_size: int
    filter: SubsetFilter
    used_by: str
    source: str
    # At most this many metadata rows, where a published count bounds the subset (None: none known).
    # Rows, not images: some URLs no longer download. The cost planner bounds the images to precompute
    # with it (a stage that draws more samples than this repeats images).
    max_rows: int | None = None


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("laion2b-en", 256, SubsetFilter(), used_by="v1-1, 256 px phase (237k steps)",
              source="laion2B-en metadata, all rows", max_rows=2_322_161_808),  # the LAION-5B paper's count
        Stage("laion-high-resolution", 512, SubsetFilter(min_width=1024, min_height=1024),
              used_by="v1-1, 512 px phase (194k steps)",
              source="LAION-5B metadata (all three parts; the model card counts ~170M rows)", max_rows=170_000_000),
        Stage("laion-improved-aesthetics", 512,
              SubsetFilter(min_width=512, min_height=512, min_aesthetic=5.0, max_pwatermark=0.5),
              used_by="v1-2 (515k steps) and v1-3 (195k steps, 10% caption dropout)",
              source="laion2B-en metadata joined with the improved aesthetic predictor's scores",
              # LAION-Aesthetics V2 5+'s published count, before the size and watermark rules: a bound.
              max_rows=600_000_000),
    )
}


def get_stage(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}") from None
