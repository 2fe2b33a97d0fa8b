"""Read W&B's offline run files (`run-<id>.wandb`): history, config and summary, without the network.

wandb 0.31 ships no Python reader for these files (the old `wandb/sdk/internal/datastore.py` is gone;
the writer is the Go `wandb-core` binary: core/internal/stream/store.go and core/pkg/leveldb). The
format, checked against files written by the installed wandb:

    file   := header block-stream
    header := ":W&B" (4 bytes) | magic u16 LE = 0xBEE1 | version u8 = 0          (7 bytes, block 0)
    the stream is cut into 32 KiB blocks (the header counts towards block 0); each block holds chunks
    chunk  := crc32 u32 LE | length u16 LE | type u8 | payload[length]
              crc = plain IEEE CRC-32 (zlib.crc32) over the type byte and the payload, unmasked
              type: 1 FULL, 2 FIRST, 3 MIDDLE, 4 LAST (a record longer than a block is split)
    a block tail shorter than a chunk header (< 7 bytes) is zero-filled and skipped.
    Each record is a serialized `wandb_internal_pb2.Record`.

What the records hold (wandb 0.31, JSON history encoding, the default):
  - `run` (once, near the start): run id, project, the initial config (ConfigItem key + value_json).
  - `config`: later config updates/removals.
  - `history`: one record per committed step; items name their key with `nested_key` (a path: a logged
    dict {"d": {"x": 1}} becomes ["d", "x"]; "train/loss" stays one element), plus `_step`,
    `_timestamp` and `_runtime`. With `x_history_value_encoding="json,typed"` items also carry a typed
    value; `value_json` is preferred when present.
  - `summary`: incremental updates (the last logged value of every key, plus explicit summary updates);
    the summary is the result of applying them in order.
  - `exit`: the exit code, written by `finish()`.
Values are JSON, so a float that is a whole number reads back as an int (1.0 -> 1), NaN and +-inf as
float("nan") / float("inf") (wandb writes the non-standard JSON tokens NaN / Infinity).
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from wandb.proto import wandb_internal_pb2 as pb

BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, chunk type
FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
FILE_IDENT = b":W&B"
FILE_MAGIC = 0xBEE1
FILE_VERSION = 0
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4

# Bookkeeping W&B adds to config and summary on its own (telemetry, runtime); never user values.
_WANDB_INTERNAL_KEY = "_wandb"


class WandbFileError(ValueError):
    """The file is not a W&B transaction log, or it is corrupt (not merely cut short)."""


@dataclass
class RunRecords:
    run_id: str
    project: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    # One dict per committed step, in file order, including `_step` (and wandb's `_timestamp`,
    # `_runtime`). Nested keys become nested dicts.
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    # Set from the `exit` record: None means the run never finished (killed, or still running and not
    # yet flushed).
    exit_code: int | None = None
    # The file ended inside a record (a writer killed mid-write); everything before it was read.
    truncated: bool = False

    def metric(self, key: str) -> list[tuple[int, Any]]:
        """(step, value) for every history row that has `key`."""
        return [(row["_step"], row[key]) for row in self.history if key in row]


def read_run(path: str | Path) -> RunRecords:
    """Parse an offline run: a `run-<id>.wandb` file, or the `offline-run-*` folder holding one."""
    path = _run_file(Path(path))
    run: RunRecords | None = None
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    exit_code: int | None = None
    data = path.read_bytes()
    truncated = False
    for payload in _iter_payloads(data, str(path)):
        if payload is None:
            truncated = True
            break
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            meta = record.run
            run = RunRecords(run_id=meta.run_id, project=meta.project, name=meta.display_name,
                             group=meta.run_group, job_type=meta.job_type)
            _apply(config, meta.config.update, meta.config.remove)
            _apply(summary, meta.summary.update, meta.summary.remove)
        elif kind == "config":
            _apply(config, record.config.update, record.config.remove)
        elif kind == "summary":
            _apply(summary, record.summary.update, record.summary.remove)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set(row, _item_path(item), _history_value(item))
            if "_step" not in row:
                row["_step"] = record.history.step.num
            history.append(row)
        elif kind == "exit":
            exit_code = record.exit.exit_code
    if run is None:
        raise WandbFileError(f"{path}: no run record (not a W&B run file, or cut off before the run began)")
    config.pop(_WANDB_INTERNAL_KEY, None)
    summary.pop(_WANDB_INTERNAL_KEY, None)
    run.config, run.summary, run.history = config, summary, history
    run.exit_code, run.truncated = exit_code, truncated
    return run


def _run_file(path: Path) -> Path:
    if path.is_file():
        return path
    files = sorted(path.glob("run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"{path}: expected one run-*.wandb file, found {len(files)}")
    return files[0]


def _iter_payloads(data: bytes, name: str) -> Iterator[bytes | None]:
    """Reassemble chunks into record payloads; yields None once if the file ends mid-record."""
    if len(data) < FILE_HEADER.size:
        raise WandbFileError(f"{name}: {len(data)} bytes, shorter than the W&B file header")
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    if ident != FILE_IDENT or magic != FILE_MAGIC:
        raise WandbFileError(f"{name}: not a W&B transaction log (header {data[:7]!r})")
    if version != FILE_VERSION:
        raise WandbFileError(f"{name}: W&B file version {version}, this reader knows {FILE_VERSION}")
    pos = FILE_HEADER.size
    pending: list[bytes] = []
    while True:
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER.size:
            pos += left_in_block  # zero-filled block trailer
            continue
        if pos >= len(data):
            if pending:
                yield None
            return
        if pos + CHUNK_HEADER.size > len(data):
            yield None
            return
        crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        start = pos + CHUNK_HEADER.size
        end = start + length
        if end > len(data):
            yield None
            return
        if crc == 0 and length == 0 and kind == 0:
            # Zero-filled space (a preallocated or torn tail); nothing after it in this block.
            pos += left_in_block
            continue
        if end > pos - pos % BLOCK_SIZE + BLOCK_SIZE:
            raise WandbFileError(f"{name}: chunk at byte {pos} crosses a block boundary")
        payload = data[start:end]
        if zlib.crc32(payload, zlib.crc32(bytes((kind,)))) != crc:
            raise WandbFileError(f"{name}: checksum mismatch in the chunk at byte {pos}")
        pos = end
        if kind == FULL and not pending:
            yield payload
        elif kind == FIRST and not pending:
            pending = [payload]
        elif kind == MIDDLE and pending:
            pending.append(payload)
        elif kind == LAST and pending:
            pending.append(payload)
            yield b"".join(pending)
            pending = []
        else:
            raise WandbFileError(f"{name}: unexpected chunk type {kind} at byte {pos - length - 7}")


def _item_path(item: Any) -> list[str]:
    return list(item.nested_key) if item.nested_key else [item.key]


def _history_value(item: pb.HistoryItem) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    typed = item.WhichOneof("value")
    if typed is None or typed == "none":
        return None
    if typed == "json":
        return json.loads(item.json)
    return getattr(item, typed)


def _apply(target: dict[str, Any], updates: Any, removes: Any) -> None:
    for item in updates:
        _set(target, _item_path(item), json.loads(item.value_json))
    for item in removes:
        keys = _item_path(item)
        parent = target
        for key in keys[:-1]:
            parent = parent.get(key, {})
        if isinstance(parent, dict):
            parent.pop(keys[-1], None)


def _set(target: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        child = target.get(key)
        if not isinstance(child, dict):
            child = target[key] = {}
        target = child
    target[keys[-1]] = value
