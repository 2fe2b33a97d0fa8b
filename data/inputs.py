"""The files a data command reads: paths, folders and brace patterns, as users give them."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from braceexpand import braceexpand


def expand_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike], suffix: str, what: str) -> list[Path]:
    """Files from paths, folders (their `*<suffix>`, sorted) and brace patterns ("/data/{00000..00099}.tar",
    the form `stage.data.shards` takes; quoted on a command line, the shell leaves the expanding to us).
    `what` names one file in the errors ("shard", "parquet file")."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    files: list[Path] = []
    for item in (Path(p) for i in items for p in braceexpand(str(i))):
        if item.is_dir():
            found = sorted(item.glob(f"*{suffix}"))
            if not found:
                raise FileNotFoundError(f"{item}: no *{suffix} files in this folder")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such {what} or folder")
    return files
