"""Every directory vtprune writes goes through here: owned, locked, written aside, swapped in atomically.

- **Ownership**: each output holds a marker (``.vtprune-output``: format, version, kind). ``--force``
  replaces a directory only if it is an output of the same kind (or an empty directory); anything
  else is refused with one line naming what is there.
- **One writer**: ``.NAME.lock`` beside the output (``flock``) makes a second writer fail fast.
- **Atomic**: files are written into ``.NAME.tmp-*`` on the same filesystem, fsynced, then exchanged
  with the old output in one ``renameat2(RENAME_EXCHANGE)``; where that is unavailable the old output
  is renamed to ``.NAME.old-*`` first, and the next writer restores it if a crash came between.
- **Nothing left**: temp dirs of killed runs (they carry the marker from their first moment) are
  removed by the next writer of the same output, which says so; parent folders this write created
  are removed again when it fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from vtprune.errors import VtpruneError

MARKER = ".vtprune-output"
FORMAT = "vtprune-output"
VERSION = 1
KINDS = {"bundle": "bundle", "report": "report directory", "comparison": "comparison directory",
         "factors": "calibration directory", "model": "model cache",
         "checkpoint": "random-weight checkpoint"}  # kind: how messages name it


# Outputs written before markers existed, known by a file of their own format: file -> (key, value, kind).
_LEGACY = {"manifest.json": ("format", "vtprune-bundle", "bundle"),
           "report.json": ("kind", "vtprune-latency-report", "report"),
           "compare.json": ("kind", "vtprune-latency-compare", "comparison"),
           "vtprune_pocket.json": (None, None, "model")}  # fmt: skip


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def owner(path: Path) -> str | None:
    """The kind of vtprune output at ``path`` (from its marker), or None when vtprune did not write it."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return None
    marker = _read_json(path / MARKER)
    if isinstance(marker, dict) and marker.get("format") == FORMAT and marker.get("kind") in KINDS:
        return marker["kind"]
    for name, (key, value, kind) in _LEGACY.items():
        data = _read_json(path / name)
        if isinstance(data, dict) and (key is None or data.get(key) == value):
            return kind
    return None


def write_marker(directory: Path, kind: str) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    text = json.dumps({"format": FORMAT, "version": VERSION, "kind": kind, "created": stamp}) + "\n"
    (Path(directory) / MARKER).write_text(text, encoding="utf-8")


def check_target(out: Path, kind: str, force: bool, error: type[VtpruneError]) -> None:
    """Refuse (before any work) to write ``out`` unless it is absent, or ``force`` and ours to replace."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    out = Path(out)
    if out.is_symlink():
        raise error(f"{out} is a symbolic link; give the real directory path for the output")
    parent = next(p for p in out.parents if p.exists())  # where the first new directory goes
    if not parent.is_dir():
        raise error(f"{parent} is a file, so {out} cannot be created there; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):  # read-only filesystems refuse even root here
        raise error(f"cannot write in {parent} (read-only or not permitted), so not {out}; choose another path")
    if not out.exists():
        return
    if not out.is_dir():
        raise error(f"{out} is a file, not a directory; choose another path (vtprune never replaces files)")
    empty = not any(out.iterdir())
    if not force and not empty:
        raise error(f"{out} already exists; pass --force to replace it")
    found = owner(out)
    if not empty and found != kind:
        what = f"a vtprune {KINDS[found]}" if found else f"holds {_listing(out)}"
        raise error(f"{out} is not a vtprune {KINDS[kind]} ({what}); refusing to replace it even with --force")


def _listing(path: Path, n: int = 3) -> str:
    names = sorted(p.name for p in path.iterdir())
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# --- the lock ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def locked(out: Path, error: type[VtpruneError], wait: bool = False) -> Iterator[Path]:
    """Hold ``.NAME.lock`` beside ``out``: a second writer fails fast (or waits, for caches)."""
    out = Path(out)
    path = out.parent / f".{out.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise error(f"cannot write next to {out}: {exc.strerror} ({out.parent})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise error(f"another vtprune is writing {out} (lock {path}); wait for it to finish") from None
        try:  # the holder before us may have unlinked the file we opened: lock the one that is there
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


# --- stale temp dirs ---------------------------------------------------------------------------------
def _siblings(out: Path, what: str) -> list[Path]:
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.{what}-[A-Za-z0-9_]+$")
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return []
    return sorted(p for p in entries if pattern.match(p.name) and not p.is_symlink() and p.is_dir())


def recover(out: Path, log: Callable[[str], None]) -> None:
    """Under the lock: put back an output a crash left moved aside, and remove killed runs' temp dirs
    (only directories that carry our marker)."""
    olds = [p for p in _siblings(out, "old") if owner(p)]
    if olds and not out.exists():
        os.rename(olds[-1], out)
        log(f"restored {out} from {olds[-1].name}, left by an interrupted replace")
        olds = olds[:-1]
    stale = [p for p in _siblings(out, "tmp") if owner(p)] + olds
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    if stale:
        log(f"removed {len(stale)} temp dir(s) left next to {out} by an interrupted run")


# --- durable writes and the swap --------------------------------------------------------------------
def fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` (and ``root`` itself) to disk."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot fsync a directory
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where the OS or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(tmp: Path, out: Path) -> None:
    """Make the finished ``tmp`` the output at ``out``; an old output is removed only afterwards."""
    if not out.exists():
        os.rename(tmp, out)
    elif exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old output
    else:  # two renames; ``recover`` puts the old one back if a crash comes between them
        old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _stderr(msg: str) -> None:
    print(f"vtprune: {msg}", file=sys.stderr, flush=True)


def _make_parents(path: Path, error: type[VtpruneError]) -> list[Path]:
    """``mkdir -p`` that returns the directories it created (deepest last)."""
    created = []
    for parent in reversed([path, *path.parents]):
        if parent.exists():
            continue
        try:
            parent.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise error(f"cannot create {parent}: {exc.strerror}") from None
        created.append(parent)
    return created


def _remove_empty(dirs: list[Path]) -> None:
    for d in reversed(dirs):
        with contextlib.suppress(OSError):
            d.rmdir()


def _os_error(exc: OSError, out: Path, error: type[VtpruneError]) -> VtpruneError:
    if exc.errno == errno.ENOSPC:
        return error(f"no space left on the device while writing {out}; nothing was changed there")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return error(f"cannot write {out}: {exc.strerror}; nothing was changed there")
    return error(f"writing {out} failed: {exc.strerror or exc}; nothing was changed there")


@contextlib.contextmanager
def atomic_dir(
    out: Path, kind: str, force: bool, error: type[VtpruneError], *, seed: bool = False, wait: bool = False,
    log: Callable[[str], None] = _stderr, lock: bool = True,
) -> Iterator[Path]:  # fmt: skip
    """Write the output directory ``out`` atomically: yields a temp dir to fill; on success it replaces
    ``out`` in one swap, on any failure (or signal) it is removed and ``out`` is as it was.

    ``seed`` starts the temp dir as hard links of the current ``out`` (an update such as adding engines
    to a bundle: unchanged files cost nothing, changed ones must be replaced, never edited in place).
    ``wait`` blocks on a concurrent writer instead of failing (shared caches); ``lock=False`` when the
    caller already holds ``locked(out)`` (to re-check a cache under it).
    """
    out = Path(out)
    check_target(out, kind, force or seed, error)
    created = _make_parents(out.parent, error)
    try:
        with locked(out, error, wait) if lock else contextlib.nullcontext():
            recover(out, log)
            check_target(out, kind, force or seed, error)  # again, under the lock
            tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
            tmp.mkdir()
            try:
                write_marker(tmp, kind)
                if seed and out.exists():
                    _link_tree(out, tmp)
                yield tmp
                if out.exists() and not (force or seed) and any(out.iterdir()):
                    raise error(f"{out} appeared while writing it; pass --force to replace it")
                os.chmod(tmp, 0o777 & ~_umask())
                fsync_tree(tmp)
                swap_in(tmp, out)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                raise _os_error(exc, out, error) from exc
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except BaseException:
        if not out.exists():
            _remove_empty(created)
        raise


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link ``src``'s files into ``dst`` (a copy where the filesystem cannot link)."""
    for dirpath, dirs, files in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        for d in dirs:
            (dst / rel / d).mkdir(exist_ok=True)
        for name in files:
            if rel == Path(".") and name == MARKER:
                continue
            try:
                os.link(Path(dirpath) / name, dst / rel / name)
            except OSError:
                shutil.copy2(Path(dirpath) / name, dst / rel / name)


def check_file_target(path: Path, fmt: str, force: bool, error: type[VtpruneError]) -> None:
    """Refuse (before any work) to write the JSON file ``path`` unless it is absent, or ``force`` and a
    vtprune file of format ``fmt`` (its ``"format"`` field)."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise error(f"{path} exists and is not a regular file; choose another path")
    if not path.exists():
        check_target(path, "report", False, error)  # the parents must be creatable
        return
    if not force:
        raise error(f"{path} already exists; pass --force to replace it")
    data = _read_json(path)
    if not (isinstance(data, dict) and data.get("format") == fmt):
        raise error(f"{path} is not a {fmt} file; refusing to replace it even with --force")


def check_free_space(out: Path, need: int, error: type[VtpruneError]) -> None:
    """Refuse, before anything is written, an output of ``need`` bytes that the disk holding ``out``
    cannot take."""
    base = Path(out).absolute()
    while not base.exists():
        base = base.parent
    free = shutil.disk_usage(base).free
    if free < need:
        raise error(f"{out} needs {need / 1e9:.1f} GB of disk and {base} has {free / 1e9:.1f} GB free; "
                    "free space or write elsewhere")  # fmt: skip


def write_json_atomic(path: Path, data: object, error: type[VtpruneError]) -> None:
    """Write JSON to ``path`` atomically, creating its parents (removed again if the write fails)."""
    path = Path(path)
    created = _make_parents(path.parent, error)
    try:
        write_file_atomic(path, (json.dumps(data, indent=2) + "\n").encode())
    except OSError as exc:
        _remove_empty(created)
        raise _os_error(exc, path, error) from exc


def write_file_atomic(path: Path, data: bytes) -> None:
    """Replace one file: a temp file beside it, fsynced, renamed over it (never cut off half-way)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
