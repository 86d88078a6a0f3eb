"""Files on any filesystem pyarrow speaks (local paths, file://, s3://, gs://, ...): the one place that turns a
location into a filesystem, lists and reads result files, and writes the small JSON files next to them.

Reading has no side effects. A result file cut short by a crash is an error when read; setting such files aside
so their rows are extracted again is an explicit step of resuming a batch job (`quarantine_unreadable`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any

from jsonextract.errors import UserError
from jsonextract.lazy import lazy

pafs = lazy("pyarrow.fs")
pq = lazy("pyarrow.parquet")

RESULT_SUFFIXES = (".parquet", ".jsonl", ".json")

# The standard variables by which pyarrow's S3 filesystem finds a bucket's endpoint and credentials.
STORAGE_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
               "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_CA_BUNDLE")


def filesystem(location: str | Path) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    location = str(location)
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def storage_env() -> dict[str, str]:
    """The object-store variables set in this process, for the runtime_env of the Ray workers a job starts: a
    worker on another node inherits that node's environment, not the driver's."""
    return {k: os.environ[k] for k in STORAGE_ENV if k in os.environ}


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def read_bytes(location: str | Path, what: str = "file") -> bytes:
    """A whole file, local or on any filesystem; UserError naming it when it is not there."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise UserError(f"{what} not found: {location}")
    with fs.open_input_stream(path) as f:
        return f.read()


def sibling(location: str | Path, name: str) -> str:
    """The file `name` in the folder that holds `location` (a path or a URI)."""
    location = str(location)
    if is_uri(location):
        return location.rsplit("/", 1)[0] + "/" + name
    return str(Path(location).with_name(name))


# Where folders copied from object storage are kept, one entry per version of a folder (its location and its files'
# names, sizes and modification times): every process on a machine that loads the same adapter shares one copy. A
# folder per process would be left behind whenever Ray ends the process with a kill (a replica or a worker at
# shutdown), which skips any clean-up, and a node's disk would fill with one copy per replica start. Kept until
# removed by hand (a process may load from its copy at any time); $JSONEXTRACT_COPIES moves the folder.
COPIES_ENV, COPIES_DEFAULT = "JSONEXTRACT_COPIES", "~/.cache/jsonextract/copies"

_copies: dict[str, Path] = {}


def copies_root() -> Path:
    """$JSONEXTRACT_COPIES, else ~/.cache/jsonextract/copies; a folder in the temporary directory where that one
    cannot be made or written (a read-only home on a cluster node): a load never fails for want of a cache."""
    root = Path(os.environ.get(COPIES_ENV) or COPIES_DEFAULT).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"jsonextract-copies-{os.getuid()}"
    fallback.mkdir(exist_ok=True)
    return fallback


def local_folder(location: str | Path) -> Path:
    """A local folder with what `location` holds: a local folder as it is; a folder in object storage copied into
    the copies folder (once per version of it, reused by later processes) and read from there (an adapter a
    replica or a job loads, e.g. s3://bucket/adapters/snips). A process keeps the version it first saw."""
    location = str(location)
    if not is_uri(location):
        return Path(location)
    if location not in _copies:
        fs, path = filesystem(location)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            raise UserError(f"folder not found: {location}")
        files = [f for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                 if f.type == pafs.FileType.File]
        version = sorted((f.path, f.size, f.mtime_ns) for f in files)
        key = hashlib.sha256(json.dumps([location, version]).encode()).hexdigest()[:24]
        root = copies_root()
        entry = root / key / PurePosixPath(path).name
        if not entry.is_dir():
            remove_abandoned_copies(root)
            tmp = Path(tempfile.mkdtemp(prefix=".copying-", dir=root))
            try:
                dest = tmp / entry.name
                dest.mkdir()
                pafs.copy_files(path, str(dest), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
                os.rename(tmp, root / key)  # one rename: a reader never sees half a copy
            except OSError:
                if not entry.is_dir():  # not a process on this machine that finished the same copy first
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        _copies[location] = entry
    return _copies[location]


# A `.copying-*` folder older than this was left by a process killed mid-copy: a copy in progress is renamed
# into place when it ends, and no adapter copy takes a day.
ABANDONED_COPY_S = 24 * 3600


def remove_abandoned_copies(root: Path) -> None:
    """Delete the half-made copies in the copies folder that processes killed while copying left behind."""
    cutoff = time.time() - ABANDONED_COPY_S
    for folder in root.glob(".copying-*"):
        try:
            if folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # removed by another process meanwhile
            pass


def put_folder(local: str | Path, location: str | Path) -> None:
    """Copy a local folder to `location` (local or URI), replacing what was there."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def is_result_file(path: str) -> bool:
    """Files named `_*` (the batch job's `_summary.json`, `_metrics.json`) or `.*` are not results."""
    name = PurePosixPath(path).name
    return name.endswith(RESULT_SUFFIXES) and not name.startswith(("_", "."))


def result_files(location: str | Path) -> list[str]:
    """Result files under a folder (recursively), or the file itself; [] when nothing is there yet."""
    fs, base = filesystem(location)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [base]
    entries = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return sorted(e.path for e in entries if e.type == pafs.FileType.File and is_result_file(e.path))


def _read_file(fs, path: str, columns: list[str] | None) -> list[dict]:
    if path.endswith(".parquet"):
        with fs.open_input_file(path) as fh:
            f = pq.ParquetFile(fh)
            have = f.schema_arrow.names
            return f.read(columns=[c for c in columns if c in have] if columns else None).to_pylist()
    with fs.open_input_stream(path) as fh:
        text = fh.read().decode("utf-8")
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows


def read_results(location: str | Path, columns: list[str] | None = None, files: list[str] | None = None) -> list[dict]:
    """Rows of a result file or folder (Parquet or JSONL), optionally only `columns` (missing ones are None) and
    only the given `files` of it. A file that cannot be read is an error naming it."""
    if files is None and "://" not in str(location) and not Path(str(location)).exists():
        raise UserError(f"not found: {location}")
    fs, _ = filesystem(location)
    rows: list[dict] = []
    for f in files if files is not None else result_files(location):
        try:
            rows += _read_file(fs, f, columns)
        except UserError:
            raise
        except Exception as e:  # pyarrow: a Parquet file cut short by a crash
            raise UserError(f"cannot read result file {f}: {e}") from None
    if columns:
        rows = [{c: r.get(c) for c in columns} for r in rows]
    return rows


def quarantine_unreadable(location: str | Path) -> list[str]:
    """Rename result files that cannot be read (cut short by a crash) to `*.corrupt`, so a resumed job extracts
    their rows again; returns the renamed files."""
    fs, _ = filesystem(location)
    moved = []
    for f in result_files(location):
        try:
            _read_file(fs, f, ["id"] if f.endswith(".parquet") else None)
        except Exception:
            fs.move(f, f + ".corrupt")
            moved.append(f)
    return moved


def remove_results(location: str | Path) -> list[str]:
    """Delete the result files under a folder (a job told to start over, not to resume); returns them."""
    fs, _ = filesystem(location)
    files = result_files(location)
    for f in files:
        fs.delete_file(f)
    return files


def write_json(folder: str | Path, name: str, obj: dict) -> str:
    """Write `obj` as `<folder>/<name>` (local or URI); returns that path as the user wrote the folder."""
    fs, base = filesystem(folder)
    with fs.open_output_stream(f"{base}/{name}") as f:
        f.write(json.dumps(obj, indent=1).encode())
    return f"{str(folder).rstrip('/')}/{name}"
