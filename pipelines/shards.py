"""Shards: one WebDataset tar -> its samples, where anything that cannot be read is an error record (CPU, no Ray).

Ray's ``read_webdataset`` streams a tar and groups members as they pass, so one odd sample (members of a key
that are not contiguous, a duplicate member, a member named ``a.__key__``, a sparse member that expands to
a gigabyte) stops the whole job, on every rerun. Here a shard is read in two passes instead:

1. Index: the tar headers only (``tarfile`` over a seekable file; no member data is read). Only regular
   files count: directories, symlinks, hard links, devices and fifos are ignored, never followed. A member
   name splits into key and extension by webdataset's rule (``_KEY_RE``: the key ends at the first dot of
   the basename); names it does not match are ignored. Members are grouped by key in the order the keys
   first appear, so ``a.png b.png b.txt a.txt`` gives two samples, ``a`` and ``b``. Names are only keys,
   never file paths.
2. Read: one sample at a time, each member's data by its offset. A sample that cannot be used is yielded
   with ``error`` set and no members: a duplicate member (same name twice), a reserved extension
   (``__key__``, ``__url__``, anything starting with ``__``), a member over ``max_member_bytes`` (judged on
   the header's size, which for a GNU sparse member is its expanded size, before a byte is read), members
   together over ``max_sample_bytes``, a key that is not valid UTF-8, or data that cannot be read.

A shard that cannot be read at all (missing, not a regular file, empty, not a tar, unreachable) gives a
single record with ``shard_error=True``. A truncated shard (or one with a broken header) gives the samples
before the cut, the sample at the cut with an error (it may have lost members), then such a record.
Compressed tars (gz, bz2, xz) are read too, decompressed on the fly.

Remote shards (any URL with ``://``) are copied, in chunks, to an anonymous temporary file (gone when
closed, even if the process is killed), then read like local ones: http(s) through urllib (pyarrow has no
http filesystem, and fsspec's needs aiohttp), every other scheme through ``pyarrow.fs.FileSystem.from_uri``,
or fsspec for the schemes pyarrow does not know.
"""

from __future__ import annotations

import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.request
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

# Sized from inputs.DEFAULT_MAX_PIXELS (64 MP): that image stored uncompressed as 8-bit RGBA is 244 MiB, so
# every image the job could decode fits. It is checked on the header, so a member claiming more costs nothing.
DEFAULT_MAX_MEMBER_BYTES = 256 * 2**20
# A sample is held in memory whole: room for image and mask at the member limit, plus slack; without a bound
# a tiny sparse tar could hold one sample of a thousand members each just under the member limit.
DEFAULT_MAX_SAMPLE_BYTES = 1024 * 2**20

_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: (key, extension)
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)  # bad bytes, not bad code
_COPY_CHUNK_BYTES = 8 * 2**20
_HTTP_TIMEOUT_S = 60  # per socket operation, not for the whole download


@dataclass
class RawSample:
    key: str  # webdataset key: member name up to the first dot of its basename, directory included
    members: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes: {"jpg": ..., "mask.png": ...}
    error: str | None = None  # why this sample cannot be used; members is then empty
    shard_error: bool = False  # the one record saying the shard could not be (fully) read; key "<shard URL>"


def iter_shard(url: str, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
               max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES) -> Iterator[RawSample]:
    """The samples of the shard at ``url`` (a local path or a URL), in order of first appearance, then at most
    one shard-level error record. Bad data never raises."""
    if max_member_bytes < 1 or max_sample_bytes < 1:
        raise ValueError(f"size limits must be positive but are {max_member_bytes} and {max_sample_bytes}.")
    limits = (max_member_bytes, max_sample_bytes)
    if "://" not in url:
        yield from _iter_local(url, limits)
        return
    with tempfile.TemporaryFile(prefix="shard-", suffix=".tar") as local:
        try:
            _download(url, local)
        except Exception as exc:  # every filesystem raises its own types (HTTPError, ArrowInvalid, ClientError...)
            yield _shard_error(url, f"shard {url} could not be read: {_one_line(exc)}")
            return
        yield from _iter_tar(local, url, limits)


def _iter_local(path: str, limits: tuple[int, int]) -> Iterator[RawSample]:
    try:
        is_file = stat.S_ISREG(os.stat(path).st_mode)  # before opening: opening a fifo would block
        f = open(path, "rb") if is_file else None
    except FileNotFoundError:
        yield _shard_error(path, f"shard {path} does not exist")
        return
    except OSError as exc:
        yield _shard_error(path, f"shard {path} cannot be opened: {_one_line(exc)}")
        return
    if f is None:
        yield _shard_error(path, f"shard {path} is not a regular file")
        return
    with f:
        yield from _iter_tar(f, path, limits)


def _download(url: str, local: BinaryIO) -> None:
    with _open_remote(url) as remote:
        shutil.copyfileobj(remote, local, _COPY_CHUNK_BYTES)
    local.seek(0)


def _open_remote(url: str):
    """A readable binary stream: urllib for http(s), else pyarrow.fs, else fsspec."""
    if url.split("://", 1)[0].lower() in ("http", "https"):
        return urllib.request.urlopen(url, timeout=_HTTP_TIMEOUT_S)
    try:
        import pyarrow.fs

        filesystem, path = pyarrow.fs.FileSystem.from_uri(url)
    except (ImportError, ValueError):  # no pyarrow, or a scheme it does not know (ArrowInvalid is a ValueError)
        import fsspec

        return fsspec.open(url, "rb").open()
    return filesystem.open_input_stream(path)


def _iter_tar(f: BinaryIO, name: str, limits: tuple[int, int]) -> Iterator[RawSample]:
    """Samples of the open shard file ``f``, then a shard error if it is empty, not a tar or truncated."""
    if f.seek(0, os.SEEK_END) == 0:
        yield _shard_error(name, f"shard {name} is empty (0 bytes)")
        return
    f.seek(0)
    try:
        tar = tarfile.open(fileobj=f, mode="r:*")
    except _READ_ERRORS as exc:
        yield _shard_error(name, f"shard {name} is not a readable tar: {_one_line(exc)}")
        return
    with tar:
        members, cut = _index(tar, name)
        yield from _samples(tar, members, cut is not None, limits)
    if cut is not None:
        yield _shard_error(name, cut)


def _index(tar: tarfile.TarFile, name: str) -> tuple[list[tarfile.TarInfo], str | None]:
    """All member headers, and why the archive does not end cleanly (None when it does).

    On a cut ``tarfile`` either raises (the data of the last member is short) or stops as if at the end
    (the next header is short or garbage): the block where it stopped must be the end-of-archive zero block."""
    members: list[tarfile.TarInfo] = []
    try:
        while (info := tar.next()) is not None:
            members.append(info)
        tar.fileobj.seek(tar.offset)
        block = tar.fileobj.read(tarfile.BLOCKSIZE)
    except _READ_ERRORS as exc:
        return members, f"shard {name} is truncated{_after(members)}: {_one_line(exc)}"
    if block == bytes(tarfile.BLOCKSIZE):
        return members, None
    if len(block) < tarfile.BLOCKSIZE:
        return members, f"shard {name} is truncated{_after(members)}"
    return members, f"shard {name} has an unreadable header{_after(members)}; the rest is not read"


def _samples(tar: tarfile.TarFile, members: list[tarfile.TarInfo], truncated: bool,
             limits: tuple[int, int]) -> Iterator[RawSample]:
    groups: dict[str, list[tuple[str, tarfile.TarInfo]]] = {}
    for info in members:
        if (split := _split(info)) is not None:
            groups.setdefault(split[0], []).append((split[1], info))
    cut_key = _last_key(members) if truncated else None
    for key, entries in groups.items():
        problems = _problems(key, entries, limits)
        if key == cut_key:
            last = entries[-1][1].name
            problems.append(f"sample may be incomplete: the shard cannot be read past its member {last!r}")
        if problems:
            yield RawSample(_printable(key), {}, "; ".join(problems))
        else:
            yield _read(tar, key, entries)


def _split(info: tarfile.TarInfo) -> tuple[str, str] | None:
    """(key, extension) of a regular member whose name follows webdataset's rule, else None (ignored)."""
    match = _KEY_RE.match(info.name) if info.isreg() else None
    return (match.group(1), match.group(2)) if match else None


def _last_key(members: list[tarfile.TarInfo]) -> str | None:
    """The key of the last member that counts: the sample a truncation may have cut short."""
    return next((split[0] for split in map(_split, reversed(members)) if split is not None), None)


def _problems(key: str, entries: list[tuple[str, tarfile.TarInfo]], limits: tuple[int, int]) -> list[str]:
    """Why a sample cannot be used, judged from its headers alone."""
    max_member, max_sample = limits
    names = Counter(info.name for _, info in entries)
    problems = [f"duplicate member {n!r} ({c} copies)" for n, c in names.items() if c > 1]
    problems += [f"member {i.name!r} has a reserved extension {e!r}" for e, i in entries if e.startswith("__")]
    too_large = [f"member {i.name!r} is {i.size} bytes, over the limit of {max_member} (--max-member-bytes)"
                 for _, i in entries if i.size > max_member]
    problems += too_large
    total = sum(info.size for _, info in entries)
    if total > max_sample and not too_large:
        problems.append(f"members total {total} bytes, over the limit of {max_sample} (--max-sample-bytes)")
    if _printable(key) != key:
        problems.append("key is not valid UTF-8")
    return problems


def _read(tar: tarfile.TarFile, key: str, entries: list[tuple[str, tarfile.TarInfo]]) -> RawSample:
    members = {}
    for ext, info in entries:
        try:
            members[ext] = tar.extractfile(info).read()  # by offset; expands sparse members
        except _READ_ERRORS as exc:
            return RawSample(key, {}, f"cannot read member {info.name!r}: {_one_line(exc)}")
    return RawSample(key, members)


def shard_error_key(url: str) -> str:
    """The key of a shard's own error record (and row)."""
    return f"<shard {url}>"


def _shard_error(name: str, message: str) -> RawSample:
    return RawSample(shard_error_key(name), {}, message, shard_error=True)


def _after(members: list[tarfile.TarInfo]) -> str:
    return f" after member {members[-1].name!r}" if members else ""


def _printable(key: str) -> str:
    """tarfile decodes bytes that are not UTF-8 to lone surrogates, which Parquet cannot store: escape them."""
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"
