"""Faults and hostile inputs: every case ends in exit 2 with one line (or a correct result), the user's
files unchanged, no temp dirs left, and nothing outside a bundle read as part of it."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from vtprune import outputs
from vtprune.errors import BundleError, InputError, ReportError

VTPRUNE = [sys.executable, "-m", "vtprune.cli"]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    from vtprune.cli import main

    rc = main(list(argv))
    return rc, capsys.readouterr().err


def write_ok(out: Path, kind: str = "report", force: bool = False, text: str = "new") -> None:
    with outputs.atomic_dir(out, kind, force, ReportError, log=lambda m: None) as tmp:
        (tmp / "report.json").write_text(text)


# --- ownership -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bundle", "report", "comparison", "factors"])
def test_force_never_replaces_a_folder_vtprune_did_not_write(tmp_path, kind):
    web = tmp_path / "site"
    web.mkdir()
    (web / "manifest.json").write_text('{"name": "my web app"}')  # a PWA manifest, not ours
    (web / "report.json").write_text("{}")
    (web / "index.html").write_text("<html>")
    before = tree(web)
    with pytest.raises(ReportError, match="refusing to replace it even with --force"):
        with outputs.atomic_dir(web, kind, True, ReportError):
            pytest.fail("must be refused before writing")
    assert tree(web) == before and sorted(p.name for p in tmp_path.iterdir()) == ["site"]


def test_force_replaces_only_the_same_kind_of_output(tmp_path):
    write_ok(tmp_path / "r")
    assert outputs.owner(tmp_path / "r") == "report"
    write_ok(tmp_path / "r", force=True, text="second")
    assert (tmp_path / "r" / "report.json").read_text() == "second"
    with pytest.raises(ReportError, match="not a vtprune bundle .*a vtprune report directory"):
        write_ok(tmp_path / "r", kind="bundle", force=True)
    with pytest.raises(ReportError, match="already exists; pass --force"):
        write_ok(tmp_path / "r")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_a_file_at_out_and_a_file_in_its_path_are_refused(tmp_path):
    (tmp_path / "f").write_text("mine")
    with pytest.raises(ReportError, match="is a file"):
        write_ok(tmp_path / "f", force=True)
    with pytest.raises(ReportError, match="is a file, so"):
        write_ok(tmp_path / "f" / "sub" / "out")
    assert (tmp_path / "f").read_text() == "mine"


def test_cli_calib_and_compare_refuse_foreign_folders(tmp_path, capsys):
    victim = tmp_path / "photos"
    victim.mkdir()
    (victim / "holiday.jpg").write_bytes(b"\xff\xd8 not really")
    rc, err = run_cli(capsys, "calib", "alvts", "--model", "tiny-llava", "--out", str(victim), "--force")
    assert rc == 2 and "refusing to replace it" in one_line(err)
    rc, err = run_cli(capsys, "compare", "a", "b", "--out", str(victim), "--force")
    assert rc == 2 and "refusing to replace it" in one_line(err)
    assert (victim / "holiday.jpg").read_bytes() == b"\xff\xd8 not really"


# --- one writer, atomic swap, recovery ------------------------------------------------------------
def test_a_second_writer_fails_fast_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "r"
    with outputs.locked(out, ReportError):
        with pytest.raises(ReportError, match="another vtprune is writing"):
            write_ok(out)
    write_ok(out)  # the lock is gone with its holder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    out = tmp_path / "r"
    code = f"from vtprune import outputs; import time\nwith outputs.locked({str(out)!r}, ValueError):\n" \
           "    print('held', flush=True); time.sleep(60)"  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(ReportError, match="another vtprune"):
        write_ok(out)
    proc.kill()
    proc.wait()
    write_ok(out)
    assert (out / "report.json").read_text() == "new"


def test_stale_temp_dirs_of_killed_runs_are_removed_and_reported(tmp_path):
    out = tmp_path / "r"
    stale = tmp_path / ".r.tmp-dead1234"
    stale.mkdir()
    outputs.write_marker(stale, "report")
    foreign = tmp_path / ".r.tmp-notours"  # same pattern, but no marker: not ours to delete
    foreign.mkdir()
    said = []
    with outputs.atomic_dir(out, "report", False, ReportError, log=said.append) as tmp:
        (tmp / "x").write_text("1")
    assert not stale.exists() and foreign.exists()
    assert said == [f"removed 1 temp dir(s) left next to {out} by an interrupted run"]


def test_an_output_moved_aside_by_a_crash_is_restored(tmp_path):
    out = tmp_path / "r"
    write_ok(out, text="precious")
    os.rename(out, tmp_path / ".r.old-abcd1234")  # the crash: old moved aside, new never renamed in
    said = []
    with pytest.raises(ReportError, match="already exists"):
        with outputs.atomic_dir(out, "report", False, ReportError, log=said.append):
            pass
    assert (out / "report.json").read_text() == "precious" and "restored" in said[0]


def test_the_two_rename_fallback_swaps_too(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "exchange", lambda a, b: False)  # a filesystem without RENAME_EXCHANGE
    write_ok(tmp_path / "r")
    write_ok(tmp_path / "r", force=True, text="second")
    assert (tmp_path / "r" / "report.json").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_disk_full_leaves_the_old_output_and_no_new_folders(tmp_path):
    write_ok(tmp_path / "r", text="old")
    for target in (tmp_path / "r", tmp_path / "new" / "deep" / "r"):
        with pytest.raises(ReportError, match="no space left on the device while writing .*nothing was changed"):
            with outputs.atomic_dir(target, "report", True, ReportError) as tmp:
                (tmp / "report.json").write_text("half")
                raise OSError(errno.ENOSPC, "No space left on device")
    assert (tmp_path / "r" / "report.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_target_is_one_line(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ReportError, match="cannot write in"):
            write_ok(ro / "r")
    finally:
        ro.chmod(0o755)
    assert list(ro.iterdir()) == []


def test_a_read_only_filesystem_is_one_line(tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *args):  # what a read-only mount answers, even to root
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(outputs.os, "open", read_only)
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: True)  # as if the check passed before a remount
    with pytest.raises(ReportError, match="cannot write next to .*Read-only file system"):
        write_ok(tmp_path / "r")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_fs(tmp_path):
    """Mount a tiny tmpfs (root only): ``small_fs(size, read_only)`` -> its mount point."""
    mounted = []

    def mount(size: str, read_only: bool = False) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)],
                                               capture_output=True).returncode != 0:  # fmt: skip
            pytest.skip("needs root and mount(8) for a real small filesystem (the patched-writer tests cover it)")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def test_a_real_full_disk_during_export_is_one_line_and_leaves_nothing(small_fs, cache_dir):
    fs = small_fs("600k")  # a tiny-llava bundle takes 1.8 MB
    proc = _export(fs / "b", cache_dir, "--no-validate")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "no space left" in err.strip().splitlines()[-1].lower() and "Traceback" not in err
    assert list(fs.iterdir()) == []


def test_a_real_read_only_filesystem_is_one_line(small_fs, capsys):
    fs = small_fs("1m", read_only=True)
    rc, err = run_cli(capsys, "calib", "alvts", "--model", "tiny-llava", "--out", str(fs / "f"))
    assert rc == 2 and "cannot write in" in one_line(err)  # before any calibration work


def test_a_failed_single_file_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    path.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        outputs.write_file_atomic(path, b"new and longer")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_an_update_never_writes_into_the_old_files(tmp_path):
    out = tmp_path / "b"
    with outputs.atomic_dir(out, "bundle", False, BundleError) as tmp:
        (tmp / "a.engine").write_bytes(b"old engine")
    old_inode = (out / "a.engine").stat().st_ino
    keep = os.open(out / "a.engine", os.O_RDONLY)  # a runner that still has the old engine open
    try:
        with outputs.atomic_dir(out, "bundle", False, BundleError, seed=True) as tmp:
            outputs.write_file_atomic(tmp / "a.engine", b"new engine")
        assert os.pread(keep, 100, 0) == b"old engine" and (out / "a.engine").read_bytes() == b"new engine"
        assert (out / "a.engine").stat().st_ino != old_inode
    finally:
        os.close(keep)


# --- signals during a real export ------------------------------------------------------------------
def _export(out: Path, cache_dir: Path, *extra: str) -> subprocess.Popen:
    argv = [*VTPRUNE, "export", "--model", "tiny-llava", "--keep", "8", "--out", str(out),
            "--cache-dir", str(cache_dir), *extra]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_temp(parent: Path, name: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not (parent.is_dir() and any(p.name.startswith(f".{name}.tmp-") for p in parent.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(1.0)  # into the export itself


def test_sigterm_during_export_leaves_nothing(tmp_path, cache_dir):
    parent = tmp_path / "made" / "by" / "export"
    proc = _export(parent / "b", cache_dir)
    _wait_for_temp(parent, "b", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "vtprune: terminated" and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [], "the folders it created are removed with its temp dir"


def test_sigkill_leaves_a_temp_dir_the_next_export_removes(tmp_path, cache_dir):
    proc = _export(tmp_path / "b", cache_dir)
    _wait_for_temp(tmp_path, "b", proc)
    proc.kill()
    proc.communicate()
    assert [p.name[:7] for p in tmp_path.iterdir() if p.name != ".b.lock"] == [".b.tmp-"]
    proc = _export(tmp_path / "b", cache_dir, "--no-validate")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "removed 1 temp dir(s) left next to" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_two_exports_to_one_out_do_not_both_succeed(tmp_path, cache_dir):
    first = _export(tmp_path / "b", cache_dir, "--no-validate")
    _wait_for_temp(tmp_path, "b", first)
    second = _export(tmp_path / "b", cache_dir, "--no-validate")
    _, err = second.communicate(timeout=300)
    assert second.returncode == 2 and "another vtprune is writing" in one_line(err)
    assert first.wait(timeout=300) == 0


# --- the sealed bundle ------------------------------------------------------------------------------
@pytest.fixture
def bundle_copy(bundles, tmp_path) -> Path:
    copy = tmp_path / "b"
    shutil.copytree(bundles["tiny-llava"], copy)
    return copy


def _edit_manifest(bundle: Path, change) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("rel", ["../../../../etc/passwd", "/etc/passwd", "processor/../../outside"])
def test_manifest_paths_outside_the_bundle_are_refused(bundle_copy, png, capsys, rel):
    _edit_manifest(bundle_copy, lambda m: m["files"].__setitem__(rel, "0" * 64))
    rc, err = run_cli(capsys, "run", str(bundle_copy), "--image", str(png), "--prompt", "x")
    assert rc == 2 and "outside the bundle" in one_line(err)


def test_processor_dir_outside_the_bundle_is_refused(bundle_copy, png, capsys, tmp_path):
    shutil.copytree(bundle_copy / "processor", tmp_path / "elsewhere")
    _edit_manifest(bundle_copy, lambda m: m.__setitem__("processor_dir", str(tmp_path / "elsewhere")))
    rc, err = run_cli(capsys, "run", str(bundle_copy), "--image", str(png), "--prompt", "x")
    assert rc == 2 and "outside the bundle" in one_line(err)


def test_symlinks_in_a_bundle_are_refused(bundle_copy, png, capsys, tmp_path):
    target = tmp_path / "embed-elsewhere.onnx"
    shutil.move(bundle_copy / "embed.onnx", target)
    (bundle_copy / "embed.onnx").symlink_to(target)
    rc, err = run_cli(capsys, "run", str(bundle_copy), "--image", str(png), "--prompt", "x")
    assert rc == 2 and "symbolic link" in one_line(err)


@pytest.mark.parametrize(
    "change, words",
    [(lambda m: m.__setitem__("files", ["vision.onnx"]), "'files' is list, not a mapping"),
     (lambda m: m.pop("graphs"), "'graphs' is missing"),
     (lambda m: m["graphs"].__setitem__("../x", {}), "unknown graph"),
     (lambda m: m["files"].pop("embed.onnx"), "embed.onnx is not among its files")],
)  # fmt: skip
def test_malformed_manifests_are_one_line(bundle_copy, png, capsys, change, words):
    _edit_manifest(bundle_copy, change)
    rc, err = run_cli(capsys, "run", str(bundle_copy), "--image", str(png), "--prompt", "x")
    assert rc == 2 and words in one_line(err)


def test_a_file_swapped_after_the_check_cannot_pass(bundle_copy):
    from vtprune.manifest import Sealed

    sealed = Sealed(bundle_copy)
    data = bytearray((bundle_copy / "embed.onnx").read_bytes())
    data[-1] ^= 0xFF
    (bundle_copy / "embed.onnx").write_bytes(bytes(data))  # after the manifest was read
    with pytest.raises(BundleError, match="embed.onnx does not match its sha256"):
        sealed.read("embed.onnx")


def test_graphs_load_from_the_descriptor_they_were_hashed_from(bundle_copy):
    from vtprune.manifest import Sealed

    sealed = Sealed(bundle_copy)
    with pytest.raises(BundleError, match="embed.onnx was modified while it was loaded"):
        with sealed.opened("embed.onnx") as (path, _):
            assert str(path).startswith("/proc/self/fd/")
            os.rename(bundle_copy / "embed.onnx", bundle_copy / "old.onnx")  # a swap does not reach the descriptor
            (bundle_copy / "embed.onnx").write_bytes(b"evil")
            assert path.read_bytes() == (bundle_copy / "old.onnx").read_bytes()
            with open(bundle_copy / "old.onnx", "ab") as f:  # an edit in place is seen
                f.write(b"x")


def test_unlisted_processor_files_are_not_read(bundle_copy):
    from vtprune.manifest import Sealed

    (bundle_copy / "processor" / "added_tokens.json").write_text('{"<evil>": 5}')
    with Sealed(bundle_copy).directory("processor") as copy:
        assert not (copy / "added_tokens.json").exists()
        assert (copy / "config.json").is_file()


def test_external_data_must_be_a_listed_bundle_file(bundle_copy, tmp_path):
    import onnx

    from vtprune.backends.ort import OrtVlm

    model = onnx.load(str(bundle_copy / "embed.onnx"))
    onnx.save(model, str(tmp_path / "e.onnx"), save_as_external_data=True, location="embed.data",
              size_threshold=0)  # fmt: skip
    shutil.copy(tmp_path / "e.onnx", bundle_copy / "embed.onnx")
    shutil.copy(tmp_path / "embed.data", bundle_copy / "embed.data")
    from vtprune.manifest import write_manifest

    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    write_manifest(bundle_copy, manifest)  # embed.data listed: it loads, from the hashed bytes
    OrtVlm(bundle_copy)
    manifest["files"].pop("embed.data")
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="embed.data is not listed"):
        OrtVlm(bundle_copy)


# --- bounded inputs ---------------------------------------------------------------------------------
def _png_header_only(path: Path, w: int, h: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(
        b"IEND", b""))  # fmt: skip


@pytest.mark.parametrize("side", [30000, 8000])  # Pillow's own bomb limit, and ours (64 MP > 50 MP)
def test_huge_images_are_refused_before_decoding(tmp_path, capsys, side):
    _png_header_only(tmp_path / "bomb.png", side, side)
    rc, err = run_cli(capsys, "run", "--model", "tiny-llava", "--image", str(tmp_path / "bomb.png"), "--prompt", "x")
    assert rc == 2 and "VTPRUNE_MAX_IMAGE_PIXELS" in one_line(err)


def test_the_pixel_cap_is_configurable(tmp_path, monkeypatch):
    from PIL import Image

    from vtprune.images import load_image

    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")
    monkeypatch.setenv("VTPRUNE_MAX_IMAGE_PIXELS", "5000")
    with pytest.raises(InputError, match="over the 0 MP limit"):
        load_image(tmp_path / "a.png")
    monkeypatch.setenv("VTPRUNE_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(InputError, match="must be a positive pixel count"):
        load_image(tmp_path / "a.png")


def test_16_bit_grey_images_keep_their_tones(tmp_path):
    from PIL import Image

    from vtprune.images import load_image

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    rgb = np.asarray(load_image(tmp_path / "g16.png"))
    assert rgb.shape == (64, 64, 3) and rgb.min() == 0 and rgb.max() == 255
    assert abs(float(rgb.mean()) - 127.5) < 1.0, "not clipped to white"


@pytest.mark.parametrize(
    "argv, words",
    [(["run", "--model", "tiny-llava", "--image", "x.png", "--prompt", "x", "--max-new-tokens", "1000000000"],
      "--max-new-tokens: 1000000000 is out of range"),
     (["run", "b", "--image", "x.png", "--prompt", "x", "--threads", "100000"], "--threads: 100000 is out of range"),
     (["run", "--model", "tiny-llava", "--image", "x.png", "--prompt", "x", "--seed", "-5"], "--seed: -5"),
     (["run", "--model", "tiny-llava", "--image", "x.png", "--prompt", "x", "--seed", "99999999999"], "--seed"),
     (["bench", "--model", "tiny-llava", "--budgets", "8", "--iters", "0", "--out", "r"], "--iters 0"),
     (["eval", "--limit", "-1"], "--limit: -1"),
     (["run", "--model", "tiny-llava", "--image", "x.png", "--prompt", "   "], "--prompt: is empty")],
)  # fmt: skip
def test_out_of_range_arguments_are_one_line(argv, words):
    proc = subprocess.run([*VTPRUNE, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and words in one_line(proc.stderr)


def test_a_prompt_that_is_not_utf8_is_one_line(tmp_path):
    argv = [os.fsencode(a) for a in [*VTPRUNE, "run", "--model", "tiny-llava", "--image", "x.png", "--prompt"]]
    proc = subprocess.run([*argv, b"caf\xe9 \xff"], capture_output=True, timeout=120)
    assert proc.returncode == 2 and "not valid UTF-8" in one_line(proc.stderr.decode())


def test_a_prompt_longer_than_the_context_is_refused(tiny_dirs, scene):
    from vtprune.config import PruneConfig
    from vtprune.models import load_vlm
    from vtprune.runtime.pipeline import PrunedVlm

    vlm = PrunedVlm(load_vlm(tiny_dirs["tiny-llava"]), PruneConfig())
    with pytest.raises(InputError, match="model's context is 512; shorten the prompt"):
        vlm.generate(scene, "word " * 600, max_new_tokens=2)


def test_decoding_stops_at_the_context_with_a_warning(tiny_dirs, scene, capsys):
    from vtprune.config import PruneConfig, SamplingConfig
    from vtprune.models import load_vlm
    from vtprune.runtime.pipeline import PrunedVlm

    vlm = PrunedVlm(load_vlm(tiny_dirs["tiny-llava"]), PruneConfig(), SamplingConfig(temperature=1.0, seed=1))
    gen = vlm.generate(scene, "x", max_new_tokens=65536)
    assert "runs past the model's 512-position context" in capsys.readouterr().err
    assert gen.prompt_tokens + len(gen.token_ids) <= 512


def test_a_closed_stdout_is_one_line(tmp_path):
    from tests.bench.conftest import make_report
    from vtprune.bench.output import write_report

    write_report(make_report(), tmp_path / "a")
    write_report(make_report(), tmp_path / "b")
    code = ("import sys; from vtprune.cli import main; sys.exit(main(['compare', sys.argv[1], sys.argv[2], '--out', "
            "sys.argv[3]]))")  # fmt: skip
    argv = [sys.executable, "-c", code, str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader went away (``| head`` that finished)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 2 and "output pipe was closed" in one_line(err)


def test_a_cache_dir_that_is_a_file_is_one_line(tmp_path, png, capsys):
    (tmp_path / "cache").write_text("not a dir")
    rc, err = run_cli(capsys, "run", "--model", "tiny-llava", "--image", str(png), "--prompt", "x",
                      "--cache-dir", str(tmp_path / "cache"))  # fmt: skip
    assert rc == 2 and str(tmp_path / "cache") in one_line(err)
