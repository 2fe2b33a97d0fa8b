"""The stage filters (data/stages.py) applied per sample while streaming, for shards that were
downloaded without them. The rules are the same objects `data.filter` applies to the parquet
metadata, so a sample kept here is a row kept there; only the column names differ (the sample's
json as img2dataset writes it), and what happens when a column is missing: the parquet filter
stops (a misnamed column would silently empty the dataset), the loader counts the sample under
`missing_metadata` and goes on (one bad json must not stop a training run; if every sample lacks
the column, the loader stops with the counts once no shard gives anything).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from data.stages import MetadataColumns, SubsetFilter, get_stage

MISSING_METADATA = "missing_metadata"


def stage_filter(name: str) -> SubsetFilter:
    """The named stage's rules, reading the json column names of img2dataset's shards."""
    return get_stage(name).filter.with_columns(MetadataColumns.img2dataset_json())


def reject_reason(rules: SubsetFilter, meta: Mapping[str, Any]) -> str | None:
    """None to keep the sample, else the skip reason: `filter_<first failed rule>` (rules in
    data.stages.RULE_COLUMNS order, so each dropped sample is counted once) or missing_metadata."""
    try:
        failed = rules.failed_rules(meta)
    except KeyError:
        return MISSING_METADATA
    return f"filter_{failed[0]}" if failed else None
