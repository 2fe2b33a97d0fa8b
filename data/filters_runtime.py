"""The stage filters (data/stages.py) applied per sample while streaming, for shards that were
downloaded without them. The rules are the same objects `data.filter` applies to the parquet
metadata, so a sample kept here is a row kept there; only the column names differ (the sample's
json as img2dataset writes it), and what happens when a column is missing: the parquet filter
stops (a misnamed column would silently empty the dataset), the loader counts the sample under
`missing_metadata` and goes on (one bad json must not stop a training run). A column that no sample
of a shard has is a setting, not bad data: `ColumnCheck` makes the loader stop at the end of that
shard, naming the column and the keys the json does have.

A column may go by another name than the filter's (data/stages.py, COLUMN_ALIASES): img2dataset keeps
the parquet's names for the columns it saves, and LAION's aesthetics subsets name their score
`aesthetic` or `AESTHETIC_SCORE`.
"""
from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from data.stages import COLUMN_ALIASES, MetadataColumns, SubsetFilter, get_stage

MISSING_METADATA = "missing_metadata"

class MissingColumns(ValueError):
    """No sample of a shard has a column the filters read: a setting (or shards downloaded without the
    column), not bad data."""


def stage_filter(name: str) -> SubsetFilter:
    """The named stage's rules, reading the json column names of img2dataset's shards."""
    return get_stage(name).filter.with_columns(MetadataColumns.img2dataset_json())


@lru_cache(maxsize=16)
def _alternatives(rules: SubsetFilter) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(column the rules read, its other names) for the columns that have any (per sample: cached)."""
    return tuple((column, tuple(a for a in group if a != column))
                 for column in rules.required_columns() for group in COLUMN_ALIASES if column in group)


def with_aliases(rules: SubsetFilter, meta: Mapping[str, Any]) -> Mapping[str, Any]:
    """`meta`, with each column the rules read that it lacks taken from one of its other names."""
    for column, others in _alternatives(rules):
        if column not in meta:
            other = next((name for name in others if name in meta), None)
            if other is not None:
                meta = {**meta, column: meta[other]}
    return meta


def missing_columns(rules: SubsetFilter, meta: Mapping[str, Any]) -> list[str]:
    """The columns the rules read that `meta` has under none of their names."""
    meta = with_aliases(rules, meta)
    return [c for c in rules.required_columns() if c not in meta]


def reject_reason(rules: SubsetFilter, meta: Mapping[str, Any]) -> str | None:
    """None to keep the sample, else the skip reason: `filter_<first failed rule>` (rules in
    data.stages.RULE_COLUMNS order, so each dropped sample is counted once) or missing_metadata."""
    try:
        failed = rules.failed_rules(with_aliases(rules, meta))
    except KeyError:
        return MISSING_METADATA
    return f"filter_{failed[0]}" if failed else None


class ColumnCheck:
    """Per shard: the columns the rules read that none of its samples' json has. Samples whose json is
    there but unreadable (parsed as {}) say nothing about the names, and are not counted."""

    def __init__(self, rules: SubsetFilter):
        self.rules = rules
        self.absent: set[str] | None = None  # None: no sample seen yet
        self.keys: set[str] = set()

    def note(self, meta: Mapping[str, Any], has_json: bool) -> None:
        if has_json and not meta:
            return
        if self.absent is None:
            self.absent = set(missing_columns(self.rules, meta))
        elif self.absent:  # once empty, it stays empty: nothing left to compute
            self.absent &= set(missing_columns(self.rules, meta))
        if self.absent:
            self.keys.update(meta)  # only for the message

    def check(self, url: str, setting: str = "stage.data.subset") -> None:
        """Raise MissingColumns if some column the rules read was in no sample's json."""
        if not self.absent:
            return
        absent = [c for c in self.rules.required_columns() if c in self.absent]
        others = dict(_alternatives(self.rules))
        names = " and ".join(" or ".join(repr(n) for n in (c, *others.get(c, ()))) for c in absent)
        have = ", ".join(sorted(self.keys)) if self.keys else "none, its samples have no .json"
        raise MissingColumns(
            f"{url}: no sample's json has {names}, which the filters of {setting} read, so every sample would be "
            f"skipped as {MISSING_METADATA} (json keys: {have}). Download the shards from metadata that has "
            f"them (python -m data download keeps every metadata column in the json), or filter the metadata "
            f"before downloading (python -m data filter) and set {setting}=null")
