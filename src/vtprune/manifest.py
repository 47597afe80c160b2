"""The bundle format: ``manifest.json`` (every setting, the sha256 of every file) and the sealed reader.

A bundle is a sealed box: every path the manifest names must stay inside the bundle (no absolute paths,
no ``..``, no symbolic links), only files the manifest lists are read, and each is hashed from the very
bytes that are then used (``Sealed.read``), so a file swapped between the check and the load cannot pass.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from vtprune import outputs
from vtprune.errors import BundleError
from vtprune.files import read_json, sha256_bytes, sha256_file

MANIFEST = "manifest.json"
FORMAT = "vtprune-bundle"
SCHEMA_VERSION = 1
PROCESSOR_DIR = "processor"
GRAPHS = ("vision", "embed", "decoder", "prefill", "decode")
# top-level manifest fields and the type each must have
FIELDS = {"model": dict, "prune": dict, "export": dict, "graphs": dict, "files": dict, "processor_dir": str,
          "tools": dict}  # fmt: skip


def write_manifest(bundle: Path, manifest: dict[str, Any]) -> None:
    """List every file of ``bundle`` with its sha256 and write the manifest (atomically)."""
    files = sorted(p for p in bundle.rglob("*") if p.is_file() and p.name not in (MANIFEST, outputs.MARKER))
    manifest["files"] = {p.relative_to(bundle).as_posix(): sha256_file(p) for p in files}
    outputs.write_file_atomic(bundle / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def read_manifest(bundle: Path, verify: bool = True) -> dict[str, Any]:
    """The bundle's manifest, checked for shape and for paths that stay inside the bundle; with ``verify``,
    every listed file must exist with its recorded sha256."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle} is not a vtprune bundle (no {MANIFEST}); create one with 'vtprune export'")
    manifest = read_json(path, BundleError, "re-export the bundle")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or (
        manifest.get("schema_version") != SCHEMA_VERSION
    ):
        raise BundleError(f"{path} is not a {FORMAT} v{SCHEMA_VERSION} manifest; re-export with this vtprune")
    check_manifest(bundle, manifest)
    if verify:
        verify_files(bundle, manifest["files"])
    return manifest


def check_manifest(bundle: Path, manifest: dict[str, Any]) -> None:
    """Refuse a malformed manifest, or one naming anything outside the bundle, with one line."""

    def bad(what: str) -> BundleError:
        return BundleError(f"{bundle / MANIFEST} is malformed: {what}; re-export the bundle")

    for key, kind in FIELDS.items():
        if not isinstance(manifest.get(key), kind):
            raise bad(f"'{key}' is {type(manifest.get(key)).__name__ if key in manifest else 'missing'}, "
                      f"not a {'mapping' if kind is dict else 'string'}")  # fmt: skip
    for rel, digest in manifest["files"].items():
        if not (isinstance(digest, str) and len(digest) == 64):
            raise bad(f"the sha256 of {rel!r} is not a hex digest")
        member(bundle, rel)
    member(bundle, manifest["processor_dir"])
    unknown = [g for g in manifest["graphs"] if g not in GRAPHS]
    if unknown:
        raise bad(f"unknown graph {unknown[0]!r} (known: {', '.join(GRAPHS)})")
    for graph, meta in manifest["graphs"].items():
        if not isinstance(meta, dict):
            raise bad(f"graph {graph!r} is described by a {type(meta).__name__}, not a mapping")
        if f"{graph}.onnx" not in manifest["files"]:
            raise bad(f"{graph}.onnx is not among its files, so nothing covers it by sha256")
    if not isinstance(manifest["model"].get("model_type"), str):
        raise bad("'model.model_type' is missing")


def member(bundle: Path, rel: Any) -> Path:
    """``bundle / rel`` if ``rel`` is a relative path that stays inside the bundle without symbolic links."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise BundleError(f"{bundle / MANIFEST} names the file {rel!r}, which is not a bundle path; re-export it")
    parts = PurePosixPath(rel)
    if parts.is_absolute() or ".." in parts.parts:
        raise BundleError(f"{bundle / MANIFEST} names {rel!r}, outside the bundle; refusing to read it")
    path = Path(bundle)
    for part in parts.parts:
        path = path / part
        if path.is_symlink():
            raise BundleError(f"{bundle}: {path.relative_to(bundle)} is a symbolic link; bundles hold plain files "
                              "only (copy the bundle with its files, not links)")  # fmt: skip
    return path


def verify_files(bundle: Path, files: dict[str, str]) -> None:
    for rel, digest in files.items():
        check_digest(rel, sha256_file(_existing(bundle, rel)), digest)


def _existing(bundle: Path, rel: str) -> Path:
    p = member(bundle, rel)
    if not p.is_file():
        raise BundleError(f"bundle file {rel} is missing from {bundle}; re-export the bundle")
    return p


def check_digest(rel: str, have: str, want: str) -> None:
    if have != want:
        raise BundleError(f"bundle file {rel} does not match its sha256 in {MANIFEST}: it was modified or corrupted")


class Sealed:
    """Reads a bundle's files the way it was sealed: only listed files, each hashed from the bytes returned."""

    def __init__(self, bundle: str | Path, verify: bool = True):
        self.root = Path(bundle)
        self.manifest = read_manifest(self.root, verify=False)
        self.files: dict[str, str] = self.manifest["files"]
        self.verify = verify

    def read(self, rel: str) -> bytes:
        """The bytes of listed file ``rel``, opened without following links and checked against the manifest."""
        fd = self._open(rel)
        with os.fdopen(fd, "rb") as f:
            data = f.read()
        if self.verify:
            check_digest(rel, sha256_bytes(data), self.files[rel])
        return data

    def mapped(self, rel: str) -> Any:
        """Listed file ``rel`` checked against the manifest, then memory-mapped read-only: for external-data
        files of many GB, whose pages then stay the page cache's instead of a second copy in memory. The
        consumer (ONNX Runtime creating a session) must take what it needs before the mapping is released;
        unlike ``read``, a change to the file between the check and that read is not seen."""
        import mmap

        fd = self._open(rel)
        try:
            self._hash_fd(fd, rel, b"")
            if os.fstat(fd).st_size == 0:
                return b""
            return mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def opened(self, rel: str, look_for: bytes = b"") -> Iterator[tuple[Path, bool]]:
        """A path naming the very file that was checked (``/proc/self/fd/N`` of the descriptor it was hashed
        from, so a library can load it without a second copy in memory), and whether ``look_for`` occurs in
        it (found while hashing). A file changed while in use is refused when the block ends."""
        fd = self._open(rel)
        try:
            before = os.fstat(fd)
            found = self._hash_fd(fd, rel, look_for)
            proc = Path(f"/proc/self/fd/{fd}")
            yield (proc if proc.exists() else member(self.root, rel)), found
            after = os.fstat(fd)
            if (before.st_size, before.st_mtime_ns, before.st_ctime_ns) != (
                after.st_size, after.st_mtime_ns, after.st_ctime_ns
            ):
                raise BundleError(f"{self.root}: {rel} was modified while it was loaded; load the bundle again")
        finally:
            os.close(fd)

    def _hash_fd(self, fd: int, rel: str, look_for: bytes) -> bool:
        digest, found, tail, chunk = hashlib.sha256(), False, b"", 1 << 22
        offset = 0
        while True:
            block = os.pread(fd, chunk, offset)
            if not block:
                break
            offset += len(block)
            digest.update(block)
            if look_for and not found:  # also across the boundary with the previous block
                found = look_for in block or look_for in tail + block[: len(look_for) - 1]
                tail = block[1 - len(look_for) :]
        if self.verify:
            check_digest(rel, digest.hexdigest(), self.files[rel])
        return found

    def _open(self, rel: str) -> int:
        """A read descriptor of listed file ``rel`` that is a regular file reached without symbolic links."""
        if rel not in self.files:
            raise BundleError(f"{self.root}: {rel} is not listed in its {MANIFEST}; re-export the bundle")
        path = _existing(self.root, rel)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise BundleError(f"{self.root}: {rel} is a symbolic link; bundles hold plain files only") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise BundleError(f"{self.root}: {rel} is not a regular file")
        return fd

    def read_json(self, rel: str) -> Any:
        try:
            return json.loads(self.read(rel))
        except (ValueError, UnicodeDecodeError) as exc:
            raise BundleError(f"{self.root}: {rel} is not valid JSON ({exc}); re-export the bundle") from None

    @contextlib.contextmanager
    def directory(self, rel_dir: str) -> Iterator[Path]:
        """A private copy of a listed directory (the processor files), written from verified bytes, so a
        library that opens files by path reads exactly what the manifest covers and nothing else."""
        prefix = rel_dir.rstrip("/") + "/"
        with tempfile.TemporaryDirectory(prefix="vtprune-bundle-") as tmp:
            for rel in self.files:
                if rel.startswith(prefix):
                    dest = Path(tmp) / rel[len(prefix) :]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(self.read(rel))
            yield Path(tmp)


def judged_precision(export: dict) -> str:
    """The precision a bundle is validated at (``check.validate.thresholds``): its language model's weights
    format or dtype; an fp32 bundle whose vision graph is int8 is ``vision-int8``."""
    precision = export.get("weights") or export.get("dtype", "fp32")
    # TensorRT's Q/DQ forms: int4-trt the same weights as int4; int8-trt int8 weights and activations, one
    # activation scale per tensor, as w8a8 (static instead of dynamic)
    precision = {"int4-trt": "int4", "int8-trt": "w8a8"}.get(precision, precision)
    return "vision-int8" if precision == "fp32" and export.get("vision") is not None else precision
