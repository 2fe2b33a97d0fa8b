"""Command-line overrides, made safe before Hydra reads them.

A shard pattern has two ways to go wrong between the shell and Hydra:
- quoted for the shell (`stage.data.shards='/data/{00000..09999}.tar'`), it reaches Hydra without the
  quotes, and Hydra's override grammar refuses the braces ("mismatched input '{'"). Such a value is
  quoted for Hydra here, so the form every shell user writes works;
- not quoted, bash expands it into one override per shard (`stage.data.shards=/data/00000.tar ...`),
  and Hydra keeps the last one: a run on a single shard, silently. A setting given twice on one command
  line is refused here, with the fix.

A misspelt setting (`stage.stepz=5`) is refused here too, naming the nearest: Hydra's own message for it
advises `+stage.stepz=5`, which the schema check after composing then refuses (train.main.to_dataclass).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from collections import defaultdict
from collections.abc import Sequence

from train.config import ConfigError, TrainConfig

# A webdataset/braceexpand pattern: {00000..09999} or {a,b}.
_BRACE_PATTERN = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")
# Values Hydra parses as something other than a plain string, or that are quoted already.
_STRUCTURED = ("'", '"', "[", "{")


def quote_for_hydra(override: str) -> str:
    """`key=value` with the value in Hydra's quotes where it holds a brace pattern and is a plain string
    (not quoted, not a list or dict, no `${...}` interpolation); any other override as it is."""
    key, sep, value = override.partition("=")
    if not sep or not value or value.startswith(_STRUCTURED) or "${" in value or "'" in value \
            or not _BRACE_PATTERN.search(value):
        return override
    return f"{key}='{value}'"


def refuse_repeated(overrides: Sequence[str]) -> None:
    """A setting given more than once is a mistake Hydra does not catch (the last one wins)."""
    values: dict[str, list[str]] = defaultdict(list)
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep:
            values[key].append(value)
    for key, given in values.items():
        if len(given) > 1:
            shown = ", ".join(given[:3]) + (", ..." if len(given) > 3 else "")
            fix = "give each setting once"
            if all("/" in value for value in given):  # paths: most likely a brace pattern the shell expanded
                fix = (f"if the shell expanded a brace pattern into one setting per file, quote the pattern: "
                       f"{key}='/data/{{00000..00099}}.tar'; otherwise " + fix)
            raise ConfigError(f"{key} is given {len(given)} times ({shown}), and Hydra would keep only the last: {fix}")


def schema_child(schema: type, name: str):
    """The dataclass `schema`'s setting `name` holds (Optional[X] unwrapped), or None where it holds a value or a
    free-form map (cluster.env)."""
    hint = typing.get_type_hints(schema)[name]
    child = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), hint)
    return child if dataclasses.is_dataclass(child) else None


def not_in_schema(name: str, schema: type, prefix: str = "") -> str:
    """`prefix + name`, a setting `schema` does not have, with the nearest names it does (or all of them)."""
    hints = list(typing.get_type_hints(schema))
    near = difflib.get_close_matches(name, hints, n=2, cutoff=0.5)
    return prefix + name + (f" (did you mean {' or '.join(prefix + n for n in near)}?)" if near else
                            f" ({prefix.rstrip('.') or 'the top level'} has {', '.join(hints)})")


def unknown_setting(key: str) -> str | None:
    """`key` (a plain override's, dotted) with the nearest names, where the schema (TrainConfig) has no such
    setting; None where it has, or where the path leaves the schema's dataclasses (a free-form map such as
    cluster.env, a value's own parts: Hydra and the composed config's check take it from there)."""
    schema, prefix = TrainConfig, ""
    for part in key.split("."):
        if part not in typing.get_type_hints(schema):
            return not_in_schema(part, schema, prefix)
        schema, prefix = schema_child(schema, part), f"{prefix}{part}."
        if schema is None:
            return None
    return None


def refuse_unknown(overrides: Sequence[str]) -> None:
    """Plain `key=value` overrides of settings the schema does not have. `+key` / `++key` are left to the
    composed config's check, `~key`, `hydra.*` and group paths (`a/b`, `x@pkg`) to Hydra."""
    unknown = []
    for override in overrides:
        key, sep, _ = override.partition("=")
        if not sep or not key or key.startswith(("+", "~")) or key.split(".")[0] == "hydra" or "/" in key \
                or "@" in key:
            continue
        found = unknown_setting(key)
        if found:
            unknown.append(found)
    if unknown:
        raise ConfigError("no such setting: " + "; ".join(unknown) + " (train/config.py has them all)")


def later_wins(*sources: Sequence[str]) -> list[str]:
    """The overrides of several sources as one command line, a key set by a later source replacing an
    earlier source's (e.g. a chain stage's own `LABEL:key=value` over the common one): the command line
    must not give a key twice."""
    merged: dict[str, str] = {}
    for source in sources:
        for override in source:
            key = override.partition("=")[0]
            merged.pop(key, None)
            merged[key] = override
    return list(merged.values())


def for_hydra(overrides: Sequence[str]) -> list[str]:
    """The overrides of one command line, checked (a setting given twice, a setting the schema does not
    have) and quoted for Hydra."""
    refuse_repeated(overrides)
    refuse_unknown(overrides)
    return [quote_for_hydra(o) for o in overrides]


def argv_for_hydra(argv: Sequence[str]) -> list[str]:
    """`python -m train`'s arguments: the overrides as `for_hydra` makes them, Hydra's flags (`--cfg job`,
    `-m`, ...) untouched."""
    positions = [i for i, a in enumerate(argv) if "=" in a and not a.startswith("-")]
    fixed = for_hydra([argv[i] for i in positions])
    out = list(argv)
    for i, override in zip(positions, fixed):
        out[i] = override
    return out
