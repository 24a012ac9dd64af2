"""Where d2c reads and writes: a local path or an object-store URI, behind one small API.

Every stage output (``run_dir``, ``train_dir``, ``eval_dir``, ``sweep.dir``) and the inputs
that point at one (``condensed``, ``checkpoint``, ``score.reuse_from``) may be

* a plain local path (``runs/x``, ``/mnt/d2c/runs/x``) — handled exactly as a path;
* ``file:///abs/path`` — the same local file system, spelled as a URI;
* ``s3://bucket/prefix`` — Amazon S3 or an S3-compatible store. pyarrow's URI options go in
  the query string and travel with the config: ``?region=us-east-1``,
  ``?endpoint_override=HOST:PORT&scheme=http`` for a store such as MinIO;
* ``gs://bucket/prefix`` (or ``gcs://``) — Google Cloud Storage.

:func:`location` resolves one of these to a :class:`Location`: a ``pyarrow.fs.FileSystem``
plus a path on it, with the few operations the stages need (join, exists, read/write
text/JSON/parquet, list, delete a tree, streams, and local staging for libraries that only
take a local path). Writes of a single file are atomic: on a local file system through a
temporary sibling and a rename; on an object store an object becomes visible only once its
upload completed. Object stores have no directory rename, so a directory is finished by a
completion marker (``_SUCCESS``) written last, never by renaming a temporary directory.

Credentials are never part of a URI (they would be recorded in ``manifest.json`` and
printed in logs): pyarrow finds them the usual way on every process that opens the store
(instance profile / IAM role / Workload Identity, or ``AWS_ACCESS_KEY_ID`` +
``AWS_SECRET_ACCESS_KEY``, ``GOOGLE_APPLICATION_CREDENTIALS``), and a local Ray started by
the driver inherits the driver's environment.

The second half of the module decides whether a local path may be used as storage when the
Ray cluster spans several nodes (:func:`local_storage_refusal`): pure functions over a node
list and a mount table, so that they are testable without a cluster.

This module imports no Ray.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import posixpath
import re
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

#: ``scheme://rest`` of a URI (a plain path has no scheme).
URI_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$", re.DOTALL)
#: The URI scheme of the local file system.
FILE_SCHEME = "file"
#: Object stores d2c is built for, and what each needs on every node.
CREDENTIAL_HINTS: dict[str, str] = {
    "s3": "AWS credentials on the driver and on every Ray node (an instance profile / IAM role, or "
    "AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY in the environment), a region (?region=... in the URI or "
    "AWS_DEFAULT_REGION), and for an S3-compatible store ?endpoint_override=HOST:PORT (plus &scheme=http "
    "without TLS) in the URI",
    "gs": "Google credentials on the driver and on every Ray node (a service account attached to the nodes, "
    "Workload Identity on GKE, or GOOGLE_APPLICATION_CREDENTIALS=/path/to/key.json in the environment)",
}
CREDENTIAL_HINTS["gcs"] = CREDENTIAL_HINTS["gs"]
#: Marker in the names of temporary files of atomic local writes (hidden: a leading dot).
TMP_MARK = ".tmp-"
#: Hex digits of the random part of a temporary name.
TMP_DIGITS = 12

PathLike = Union[str, os.PathLike]


class StorageError(OSError):
    """A storage URI that cannot be used, or an I/O failure on one; the message names the URI and the fix."""


def is_uri(value: Union[PathLike, "Location"]) -> bool:
    """True for ``scheme://...`` strings (``file://`` included), False for plain paths."""
    return isinstance(value, str) and URI_RE.match(value) is not None


def uri_scheme(value: str) -> str:
    """The lower-case scheme of a URI (``""`` for a plain path)."""
    m = URI_RE.match(value) if isinstance(value, str) else None
    return m.group(1).lower() if m else ""


def _split_query(rest: str) -> tuple[str, str]:
    """``bucket/key?a=1`` → (``bucket/key``, ``a=1``)."""
    base, _, query = rest.partition("?")
    return base, query


def _tmp_name(name: str) -> str:
    """A hidden temporary sibling name that keeps the suffix (``x.npz`` → ``.x.tmp-<hex>.npz``)."""
    stem, suffix = os.path.splitext(name)
    return f".{stem}{TMP_MARK}{uuid.uuid4().hex[:TMP_DIGITS]}{suffix}"


class Location:
    """A file or directory on a local path or in an object store (see the module docstring).

    ``str(loc)`` is the path or URI in the form the user wrote it (query options kept), so it
    can be put back into a config, passed to another process and resolved again.
    """

    __slots__ = ("fs", "path", "scheme", "query", "_text")

    def __init__(self, fs: pafs.FileSystem, path: str, scheme: str = "", query: str = "", text: Optional[str] = None):
        #: The pyarrow file system.
        self.fs = fs
        #: The path on ``fs`` (absolute for a local file system; ``bucket/key`` for an object store).
        self.path = path
        #: ``""`` for a plain local path, else the URI scheme (``file``, ``s3``, ``gs``, ...).
        self.scheme = scheme
        #: pyarrow options of the URI (``endpoint_override=...&scheme=http``), re-attached on join.
        self.query = query
        self._text = text

    # -- naming -----------------------------------------------------------------------
    def __str__(self) -> str:
        if self.scheme == "":
            return self._text if self._text is not None else self.path
        if self.scheme == FILE_SCHEME:
            return f"file://{self.path}"
        return f"{self.scheme}://{self.path}" + (f"?{self.query}" if self.query else "")

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and (self.scheme, self.path, self.query) == (other.scheme, other.path, other.query)

    def __hash__(self) -> int:
        return hash((self.scheme, self.path, self.query))

    def __lt__(self, other: "Location") -> bool:
        return str(self) < str(other)

    def __fspath__(self) -> str:
        """A local location is path-like (``open``, pandas, safetensors take it); an object store is not."""
        if not self.is_local:
            raise StorageError(f"{self} is in an object store, not a local path; read it through d2c.storage "
                               "(read_* methods, local_copy())")
        return str(self.local_path)

    @property
    def is_local(self) -> bool:
        """True on the local file system (a plain path or ``file://``)."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def local_path(self) -> Path:
        """The local path (as written, for a plain path). Raises StorageError for an object store."""
        if not self.is_local:
            raise StorageError(f"{self} is not on the local file system; stage it with local_copy() / local_output()")
        return Path(self._text) if self.scheme == "" and self._text is not None else Path(self.path)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/")) if not self.is_local else self.local_path.name

    @property
    def suffix(self) -> str:
        return os.path.splitext(self.name)[1]

    def _with(self, path: str, text: Optional[str]) -> "Location":
        return Location(self.fs, path, self.scheme, self.query, text)

    def __truediv__(self, name: str) -> "Location":
        name = str(name)
        if self.is_local:
            text = str(Path(self._text) / name) if self.scheme == "" and self._text is not None else None
            return self._with(os.path.join(self.path, name), text)
        return self._with(posixpath.join(self.path.rstrip("/"), name), None)

    def joinpath(self, *names: str) -> "Location":
        loc = self
        for n in names:
            loc = loc / n
        return loc

    @property
    def parent(self) -> "Location":
        if self.is_local:
            text = str(Path(self._text).parent) if self.scheme == "" and self._text is not None else None
            return self._with(os.path.dirname(self.path.rstrip(os.sep)) or os.sep, text)
        return self._with(posixpath.dirname(self.path.rstrip("/")), None)

    def absolute(self) -> "Location":
        """The same location with a resolved absolute local path (``Path.resolve``); object stores unchanged."""
        if self.scheme == "" and self._text is not None:
            resolved = str(Path(self._text).expanduser().resolve())
            return self._with(resolved, resolved)
        return self

    def same_as(self, other: "Location") -> bool:
        """True when both name the same place: on the local file system the same resolved path
        (a plain path and its ``file://`` URI included), on a store the same scheme and path
        (URI options such as ``?region=`` do not change the place)."""
        if self.is_local and other.is_local:
            return os.path.realpath(self.path) == os.path.realpath(other.path)
        return (self.scheme, self.path.rstrip("/")) == (other.scheme, other.path.rstrip("/"))

    # -- errors -----------------------------------------------------------------------
    def _fail(self, op: str, err: BaseException) -> StorageError:
        hint = CREDENTIAL_HINTS.get(self.scheme)
        fix = f" Check that the bucket exists and that this process has {hint}." if hint else ""
        return StorageError(f"cannot {op} {self}: {err}.{fix}")

    def _call(self, op: str, fn: Callable[[], Any]) -> Any:
        """Run one file system call, turning I/O failures into StorageError (missing files stay FileNotFoundError)."""
        try:
            return fn()
        except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError):
            raise
        except (OSError, pa.ArrowException) as err:
            if isinstance(err, StorageError):
                raise
            raise self._fail(op, err) from err

    # -- queries ----------------------------------------------------------------------
    def info(self) -> pafs.FileInfo:
        return self._call("stat", lambda: self.fs.get_file_info(self.path))

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def iterdir(self) -> list["Location"]:
        """Direct children (files and directories), sorted by name; [] when missing."""
        sel = pafs.FileSelector(self.path, recursive=False, allow_not_found=True)
        infos = self._call("list", lambda: self.fs.get_file_info(sel))
        names = sorted({posixpath.basename(i.path.rstrip("/")) for i in infos} - {""})
        return [self / n for n in names]

    def files(self, suffix: str = "") -> list["Location"]:
        """Direct child files whose names end with ``suffix``, sorted; [] when missing."""
        sel = pafs.FileSelector(self.path, recursive=False, allow_not_found=True)
        infos = self._call("list", lambda: self.fs.get_file_info(sel))
        names = sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File)
        return [self / n for n in names if n.endswith(suffix)]

    def glob(self, pattern: str) -> list["Location"]:
        """Children matching a ``fnmatch`` pattern, one segment per level (``part-*/*.parquet``), sorted."""
        level = [self]
        for segment in pattern.split("/"):
            level = [c for loc in level for c in loc.iterdir() if fnmatch.fnmatchcase(c.name, segment)]
        return sorted(level)

    def walk_files(self) -> list[str]:
        """Relative POSIX paths of every file below this directory, sorted; [] when missing."""
        sel = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        infos = self._call("list", lambda: self.fs.get_file_info(sel))
        base = self.path.rstrip("/").rstrip(os.sep)
        out = []
        for i in infos:
            if i.type == pafs.FileType.File:
                rel = i.path[len(base):].lstrip("/").lstrip(os.sep)
                out.append(rel.replace(os.sep, "/"))
        return sorted(out)

    # -- whole-file reads and writes ----------------------------------------------------
    def read_bytes(self) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()

        return self._call("read", read)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def read_json(self) -> Any:
        return json.loads(self.read_text())

    def _atomic_local(self, write: Callable[[Path], None]) -> None:
        final = Path(self.path)
        tmp = final.with_name(_tmp_name(final.name))
        try:
            write(tmp)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file atomically (see the module docstring)."""
        if self.is_local:
            self._atomic_local(lambda tmp: tmp.write_bytes(data))
            return

        def put() -> None:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)

        self._call("write", put)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def write_json(self, obj: Any) -> None:
        """JSON with indent 2 and sorted keys (the stages' format), written atomically."""
        self.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))

    # -- parquet --------------------------------------------------------------------------
    def read_table(self, columns: Optional[Sequence[str]] = None) -> pa.Table:
        """A parquet file, or every parquet file of a directory (``_``/``.``-prefixed files ignored)."""
        return self._call("read parquet from", lambda: pq.read_table(self.path, filesystem=self.fs, columns=columns))

    def read_schema(self) -> pa.Schema:
        return self._call("read the parquet schema of", lambda: pq.read_schema(self.path, filesystem=self.fs))

    def read_pandas(self, columns: Optional[Sequence[str]] = None):
        """``pandas.read_parquet`` of this file or directory."""
        import pandas as pd

        return self._call("read parquet from", lambda: pd.read_parquet(self.path, filesystem=self.fs, columns=columns))

    def write_parquet(self, table) -> None:
        """Write a pyarrow Table (or a pandas DataFrame, without its index) as one parquet file, atomically."""
        if not isinstance(table, pa.Table):
            table = pa.Table.from_pandas(table, preserve_index=False)
        if self.is_local:
            self._atomic_local(lambda tmp: pq.write_table(table, tmp))
            return
        self._call("write parquet to", lambda: pq.write_table(table, self.path, filesystem=self.fs))

    # -- directories and deletion -----------------------------------------------------------
    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        """Create the directory (on an object store: a directory marker; harmless)."""
        if not exist_ok and self.exists():
            raise FileExistsError(str(self))
        self._call("create the directory", lambda: self.fs.create_dir(self.path, recursive=parents))

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.exists():
            return
        self._call("delete", lambda: self.fs.delete_file(self.path))

    def rmtree(self) -> None:
        """Delete this directory and everything below it; a no-op when it does not exist."""
        kind = self.info().type
        if kind == pafs.FileType.NotFound:
            return
        if kind == pafs.FileType.File:
            self._call("delete", lambda: self.fs.delete_file(self.path))
            return
        self._call("delete the directory", lambda: self.fs.delete_dir(self.path))

    # -- streams ------------------------------------------------------------------------------
    def open_input(self):
        """A random-access input file (a context manager)."""
        return self._call("open", lambda: self.fs.open_input_file(self.path))

    def open_output(self):
        """An output stream (a context manager); not atomic on a local file system — prefer the write_* methods."""
        return self._call("open for writing", lambda: self.fs.open_output_stream(self.path))

    # -- copies and local staging ---------------------------------------------------------------
    def upload_from(self, local: PathLike) -> None:
        """Copy a local file, or a local directory tree, to this location (files overwritten, others kept)."""
        src = Path(local)
        if src.is_file():
            self._call("upload to", lambda: pafs.copy_files(str(src), self.path, destination_filesystem=self.fs))
            return
        self.mkdir()
        self._call("upload to", lambda: pafs.copy_files(str(src), self.path, source_filesystem=pafs.LocalFileSystem(),
                                                        destination_filesystem=self.fs))

    def download_to(self, local: PathLike) -> Path:
        """Copy this file, or this directory tree, to ``local``; returns ``local``."""
        dst = Path(local)
        if self.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            self._call("download", lambda: pafs.copy_files(self.path, str(dst), source_filesystem=self.fs,
                                                           destination_filesystem=pafs.LocalFileSystem()))
            return dst
        if not self.is_dir():
            raise FileNotFoundError(f"{self} does not exist")
        dst.mkdir(parents=True, exist_ok=True)
        self._call("download", lambda: pafs.copy_files(self.path, str(dst), source_filesystem=self.fs,
                                                       destination_filesystem=pafs.LocalFileSystem()))
        return dst

    def copy_to(self, other: "Location") -> None:
        """Copy this file to ``other`` (any file system), atomically at the destination."""
        if other.is_local:
            other._atomic_local(lambda tmp: self.download_to(tmp))
            return
        self._call("copy", lambda: pafs.copy_files(self.path, other.path, source_filesystem=self.fs,
                                                   destination_filesystem=other.fs))

    @contextlib.contextmanager
    def local_copy(self) -> Iterator[Path]:
        """A local path holding this file or directory: the path itself when local, else a
        temporary download (same name) removed on exit."""
        if self.is_local:
            yield self.local_path
            return
        with tempfile.TemporaryDirectory(prefix="d2c-stage-") as tmp:
            yield self.download_to(Path(tmp) / self.name)

    @contextlib.contextmanager
    def local_output(self) -> Iterator[Path]:
        """A local path for a library to write this one file to; on success it lands here atomically.

        Local: a hidden temporary sibling with the same suffix, renamed into place. Object store:
        a file in a temporary directory, uploaded on exit. Nothing is left behind on failure.
        """
        if self.is_local:
            final = Path(self.path)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(_tmp_name(final.name))
            try:
                yield tmp
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
            return
        with tempfile.TemporaryDirectory(prefix="d2c-stage-") as tmp:
            path = Path(tmp) / self.name
            yield path
            self.upload_from(path)

    @contextlib.contextmanager
    def local_output_dir(self) -> Iterator[Path]:
        """A local directory for a library to write several files into; they land here on success.

        Local: this directory itself (created), written in place. Object store: a temporary
        directory whose files are uploaded on exit.
        """
        if self.is_local:
            self.local_path.mkdir(parents=True, exist_ok=True)
            yield self.local_path
            return
        with tempfile.TemporaryDirectory(prefix="d2c-stage-") as tmp:
            path = Path(tmp) / self.name
            path.mkdir()
            yield path
            self.upload_from(path)

    # -- Ray Data ------------------------------------------------------------------------------
    def for_ray(self) -> tuple[str, Optional[pafs.FileSystem]]:
        """``(path, filesystem)`` for ``ray.data.read_parquet`` / ``Dataset.write_parquet``: a local path is
        passed as a plain path (filesystem None, as Ray Data resolves it itself), an object store with its
        pyarrow file system (pickled to the Ray workers, which find their own credentials)."""
        if self.is_local:
            return str(self.local_path), None
        return self.path, self.fs


def location(value: Union[PathLike, Location]) -> Location:
    """Resolve a local path or a ``file://`` / ``s3://`` / ``gs://`` URI to a :class:`Location`.

    Raises:
        StorageError: an unknown scheme, credentials written into the URI, or options pyarrow
            does not accept — the message names the URI and the fix.
    """
    if isinstance(value, Location):
        return value
    if isinstance(value, os.PathLike) or not is_uri(value):
        text = os.fspath(value)
        if not text:
            raise StorageError("an empty path was given as storage; set it to a directory or a s3:// / gs:// URI")
        text = str(Path(text).expanduser())
        return Location(pafs.LocalFileSystem(), os.path.abspath(text), "", "", text)
    scheme = uri_scheme(value)
    rest = URI_RE.match(value).group(2)
    base, query = _split_query(rest)
    if scheme == FILE_SCHEME:
        if query:
            raise StorageError(f"{value!r}: a file:// URI takes no ?options; remove {query!r}")
        if not base.startswith("/"):
            raise StorageError(f"{value!r}: a file:// URI needs an absolute path (file:///abs/path, three slashes)")
        return Location(pafs.LocalFileSystem(), os.path.normpath(base), FILE_SCHEME)
    netloc = base.split("/", 1)[0]
    if "@" in netloc:
        raise StorageError(
            f"{scheme}://{netloc.rsplit('@', 1)[1]}/...: credentials written into a storage URI would be recorded in "
            "manifest.json and printed in logs; remove them from the URI and give them to every node in the environment "
            f"instead ({CREDENTIAL_HINTS.get(scheme, 'see the store documentation')})"
        )
    if not netloc:
        raise StorageError(f"{value!r} names no bucket; write {scheme}://BUCKET/prefix")
    try:
        fs, path = pafs.FileSystem.from_uri(value)
    except (pa.ArrowException, ValueError, OSError) as err:
        message = str(err)
        if "Unrecognized filesystem type" in message:
            return _fsspec_location(value, scheme, base, err)
        raise StorageError(f"cannot open storage {value!r}: {message}. "
                           "Fix the URI (pyarrow's S3/GCS URI options go after '?', e.g. ?region=us-east-1)") from None
    return Location(fs, path.rstrip("/"), scheme, query)


def _fsspec_location(value: str, scheme: str, base: str, cause: BaseException) -> Location:
    """A scheme pyarrow does not know, through an installed fsspec implementation (e.g. ``az://`` with adlfs)."""
    import fsspec

    try:
        impl = fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as err:
        raise StorageError(
            f"cannot open storage {value!r}: pyarrow does not know the scheme {scheme!r} ({cause}) and fsspec has no "
            f"usable implementation of it ({err}). Use s3://, gs://, file:// or a local path, or install the fsspec "
            f"package for {scheme}://"
        ) from None
    handler = pafs.FSSpecHandler(impl())
    return Location(pafs.PyFileSystem(handler), base.rstrip("/"), scheme, "")


def write_json_atomic(path: Union[PathLike, Location], obj: Any) -> None:
    """JSON with indent 2 and sorted keys, written atomically to a path or URI."""
    location(path).write_json(obj)


# ----------------------------------------------------------------------------------------------
# Append-only logs (metrics.jsonl, events.jsonl) on stores that cannot append
# ----------------------------------------------------------------------------------------------


class JsonlLog:
    """A JSON-lines file that one process appends to.

    Local: every line is appended to the file at once (as plain ``open(..., "a")``).
    Object store (no appends): the file's current content is read once, lines are kept in
    memory, and the whole file is rewritten by :meth:`flush` — call it at every checkpoint
    and at the end, so that the remote file always covers the last checkpoint; with
    ``flush_every_s``, :meth:`append` also flushes when that many seconds have passed.
    """

    def __init__(self, loc: Location, flush_every_s: Optional[float] = None):
        self.loc = loc
        self.flush_every_s = flush_every_s
        self._remote_text: Optional[str] = None
        self._dirty = False
        self._flushed_at = time.monotonic()

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        if self.loc.is_local:
            with open(self.loc.local_path, "a") as f:
                f.write(line)
            return
        if self._remote_text is None:
            self._remote_text = self.loc.read_text() if self.loc.is_file() else ""
        self._remote_text += line
        self._dirty = True
        if self.flush_every_s is not None and time.monotonic() - self._flushed_at >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Make every appended line visible at the location (a no-op locally)."""
        if self._dirty and self._remote_text is not None:
            self.loc.write_text(self._remote_text)
            self._dirty = False
        self._flushed_at = time.monotonic()


    def keep_through(self, step: int) -> int:
        """Drop the lines whose ``step`` is past ``step``, and a torn last line: what a run wrote
        after the checkpoint it resumes from. Resuming then logs each step once. Returns how many
        lines were dropped."""
        if not self.loc.is_file():
            return 0
        lines = (self._remote_text if self._remote_text is not None else self.loc.read_text()).splitlines()
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed process
                continue
            if not isinstance(record, dict) or record.get("step", step) <= step:
                kept.append(line)
        dropped = len(lines) - len(kept)
        if dropped:
            text = "".join(line + "\n" for line in kept)
            self.loc.write_text(text)
            if self._remote_text is not None:
                self._remote_text = text
        return dropped


def append_line(loc: Location, record: dict[str, Any]) -> None:
    """Append one JSON line and make it visible at once (for rare events)."""
    log = JsonlLog(loc)
    log.append(record)
    log.flush()


# ----------------------------------------------------------------------------------------------
# Multi-node clusters: is a local path shared storage?
# ----------------------------------------------------------------------------------------------

#: File system types (``/proc/mounts``' third field) that other machines can see too.
NETWORK_FS_TYPES = frozenset({
    "nfs", "nfs4", "cifs", "smb", "smb2", "smb3", "smbfs", "lustre", "gpfs", "ceph", "cephfs", "beegfs", "glusterfs",
    "efs", "afs", "ocfs2", "gfs2", "panfs", "wekafs", "orangefs", "pvfs2", "9p", "virtiofs",
})
#: FUSE file systems (``fuse.<name>``) are taken as shared — gcsfuse, s3fs, mountpoint-s3, sshfs,
#: JuiceFS, ... — except these, which are local by construction.
LOCAL_FUSE_TYPES = frozenset({"fuse.lxcfs", "fuse.fuse-overlayfs", "fuse.gvfsd-fuse", "fuse.portal", "fuse.snapfuse"})
FUSE_PREFIX = "fuse."
#: Where Linux lists the mounts of this process's mount namespace.
PROC_MOUNTS = "/proc/mounts"
#: The config key that turns the refusal off.
ALLOW_LOCAL_KEY = "ray.allow_local_storage"
#: /proc/mounts escapes these characters of a mount point as octal.
_MOUNT_ESCAPE_RE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    """One line of a mount table: where, and which file system type."""

    point: str
    fstype: str


def parse_mounts(text: str) -> list[Mount]:
    """Parse ``/proc/mounts`` text (``device point fstype options dump pass`` per line)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _MOUNT_ESCAPE_RE.sub(lambda m: chr(int(m.group(1), 8)), fields[1])
        mounts.append(Mount(point, fields[2]))
    return mounts


def read_mounts(path: str = PROC_MOUNTS) -> Optional[list[Mount]]:
    """This machine's mount table, or None when it cannot be read (not Linux)."""
    try:
        with open(path) as f:
            return parse_mounts(f.read())
    except OSError:
        return None


def mount_of(path: str, mounts: Sequence[Mount]) -> Optional[Mount]:
    """The mount holding ``path`` (an absolute, resolved path): the longest matching mount point, the last one
    listed winning among equals (a later mount hides an earlier one)."""
    best: Optional[Mount] = None
    for m in mounts:
        point = m.point.rstrip("/") or "/"
        inside = path == point or point == "/" or path.startswith(point + "/")
        if inside and (best is None or len(point) >= len(best.point.rstrip("/") or "/")):
            best = m
    return best


def is_shared_fstype(fstype: str) -> bool:
    """True for network and distributed file systems (and FUSE mounts other than a few local ones)."""
    fstype = fstype.lower()
    if fstype in NETWORK_FS_TYPES:
        return True
    return fstype.startswith(FUSE_PREFIX) and fstype not in LOCAL_FUSE_TYPES


def spans_nodes(nodes: Sequence[dict[str, Any]], driver_node_id: Optional[str]) -> tuple[bool, str]:
    """Whether a stage's work can land on nodes other than the driver's, and why.

    Args:
        nodes: ``ray.nodes()`` entries (``NodeID``, ``Alive``, ``Resources``).
        driver_node_id: the driver's node (``ray.get_runtime_context().get_node_id()``).
    Returns:
        (True, reason) when more than one node is alive, or when the driver's node offers no
        CPUs (an autoscaling cluster whose head runs no work: every task goes to worker nodes
        that may not exist yet); else (False, "").
    """
    alive = [n for n in nodes if n.get("Alive")]
    if len(alive) > 1:
        return True, f"the Ray cluster has {len(alive)} alive nodes"
    for n in alive:
        if n.get("NodeID") == driver_node_id and not (n.get("Resources") or {}).get("CPU"):
            return True, "the driver's node offers no CPUs, so the work runs on other (possibly autoscaled) nodes"
    return False, ""


def local_storage_refusal(key: str, value: Optional[str], multi_node: bool, reason: str,
                          mounts: Optional[Sequence[Mount]], allow_local: bool) -> Optional[str]:
    """Why ``key=value`` cannot be storage on this cluster, or None when it can.

    A plain path or ``file://`` URI is refused when the work spans nodes (``multi_node``) and
    the path is not on a network file system according to ``mounts`` (None = unknown:
    refused too), unless ``allow_local``. Object-store URIs are always accepted.
    """
    if not value or not multi_node or allow_local:
        return None
    scheme = uri_scheme(value) if is_uri(value) else ""
    if scheme not in ("", FILE_SCHEME):
        return None
    local = location(value)
    resolved = os.path.realpath(local.path)
    mount = mount_of(resolved, mounts) if mounts is not None else None
    if mount is not None and is_shared_fstype(mount.fstype):
        return None
    where = (f"on the node-local file system {mount.fstype!r} mounted at {mount.point}" if mount is not None
             else f"on a file system d2c cannot identify ({PROC_MOUNTS} is unreadable)")
    return (
        f"{key}={value!r} is {where}, but {reason}: each node would write its own partial copy under that path "
        "(Ray Data write tasks, Ray Train workers and their checkpoints run on whichever node Ray picks), and no "
        f"node could read the others'. Use shared storage: {key}=s3://BUCKET/PREFIX or {key}=gs://BUCKET/PREFIX, or a "
        "path on a file system mounted on every node (NFS, Lustre, a bucket mounted with s3fs/gcsfuse, ...). If that "
        f"path is shared in a way d2c cannot see, set {ALLOW_LOCAL_KEY}=true."
    )

