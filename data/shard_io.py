"""Reading one WebDataset tar shard as a sequence of samples, from a local path or a `pipe:` URL.

Read here rather than through webdataset because the loader must know *why* a shard gave fewer
samples than it holds: webdataset 1.0.2 either raises or, with `warn_and_continue`, drops a shard
with a bare `DecodingError()`, and refuses `pipe:` URLs unless its global "unsafe" switch is set.
Every way a shard can go wrong is counted under one of the reasons below and never raises.
"""
from __future__ import annotations

import subprocess
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

# Shard-level reasons (one count per shard); the sample-level ones live with the loader.
UNREADABLE_SHARD = "unreadable_shard"  # could not be opened, or failed before its first member
# failed after some members, or ended without tar's end-of-archive marker: the samples before it are kept
TRUNCATED_TAR = "truncated_tar"
EMPTY_SHARD = "empty_shard"  # a well-formed tar without samples (img2dataset's shard of failed URLs)

_PIPE_BUFFER = 1 << 20


class ShardOpenError(OSError):
    pass


@contextmanager
def open_shard(url: str) -> Iterator[IO[bytes]]:
    """A binary stream of the shard. `pipe:CMD` runs CMD in a shell and reads its stdout (e.g.
    `pipe:aws s3 cp s3://bucket/00001.tar -`); anything else is a local path (`file:` allowed).
    A command that exits non-zero raises ShardOpenError when the stream is closed."""
    if url.startswith("pipe:"):
        # stderr is inherited, so the command's own message (e.g. from aws) reaches the job log.
        proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, bufsize=_PIPE_BUFFER)
        finished = False
        try:
            yield proc.stdout
            finished = True
        finally:
            if finished:
                # Drain what tarfile left (end-of-archive padding) so the command can exit normally.
                while proc.stdout.read(_PIPE_BUFFER):
                    pass
            else:
                proc.kill()
            proc.stdout.close()
            status = proc.wait()
        if status != 0:
            raise ShardOpenError(f"{url}: command exited with status {status}")
    else:
        with open(url[len("file:"):] if url.startswith("file:") else url, "rb", buffering=_PIPE_BUFFER) as f:
            yield f


class _MarkedEnd(tarfile.TarInfo):
    """Reads headers as TarInfo does, but lets only tar's end-of-archive marker, two zero blocks, end the
    archive. tarfile ends it quietly, as if complete, at a header that is cut short, missing or not a header,
    so a shard cut at a member boundary (or inside a header) would lose its other samples uncounted."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # one zero block
            if tar.fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
                raise tarfile.ReadError(f"no end-of-archive marker at {tar.offset}: a single zero block") from None
            raise
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as err:
            if tar.offset == 0:
                raise  # before the first member: tarfile's own error (not a tar, empty file)
            # Not a HeaderError, which tarfile would take for the end of the archive.
            raise tarfile.ReadError(f"no end-of-archive marker at {tar.offset}: {err}") from None


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's convention: the key is the path up to the first dot of the basename, the
    extension everything after it ("dir/000123.latent.npy" -> ("dir/000123", "latent.npy"))."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


def iter_shard_samples(url: str, counts: Counter,
                       unreadable: list[str] | None = None) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """Yields (index in shard, key, {extension: bytes}) for each sample in tar order. A sample's
    members are consecutive in a WebDataset tar; when reading fails part-way, the sample being
    assembled is dropped (it may be missing members) and the shard counts as truncated, as it does when
    the tar ends without its end-of-archive marker (cut at a member boundary or inside a header).
    A shard that fails before its first member appends its error to `unreadable`, if given: the count
    alone does not say why (a permission, a mount, the `pipe:` command's credentials)."""
    index = 0
    members_seen = 0
    key, sample = None, {}
    try:
        with open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|*", tarinfo=_MarkedEnd) as tar:
            for info in tar:
                members_seen += 1
                if not info.isfile():
                    continue
                member_key, ext = split_member_name(info.name)
                # A new key completes the previous sample before this member's data is read,
                # so a tar cut inside this member still delivers the previous sample.
                if member_key != key:
                    if sample:
                        yield index, key, sample
                        index += 1
                    key, sample = member_key, {}
                sample[ext] = tar.extractfile(info).read()
        if sample:
            yield index, key, sample
            index += 1
    except (OSError, tarfile.TarError, EOFError, ValueError, zlib.error) as err:
        # ValueError: a header field that does not parse; zlib.error: a corrupt .tar.gz.
        counts[TRUNCATED_TAR if members_seen else UNREADABLE_SHARD] += 1
        if not members_seen and unreadable is not None:
            unreadable.append(f"{url}: {type(err).__name__}: {err}")
        return
    if index == 0:
        counts[EMPTY_SHARD] += 1
