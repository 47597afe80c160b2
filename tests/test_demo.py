"""`vtprune demo` end to end on a tiny model (the pocket default runs in `make demo`)."""

from __future__ import annotations

from vtprune.cli import main


def test_demo_exports_three_bundles_and_prints_answers_and_latency(cache_dir, capsys):
    assert main(["demo", "--model", "tiny-llava", "--keep", "16", "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "unpruned:" in out and "gprune:" in out and "alvts:" in out and "TTFT" in out
    assert "16/64" in out
    bundles = sorted(p.name for p in (cache_dir / "bundles").iterdir())
    assert bundles == ["tiny-llava-alvts-4-l1", "tiny-llava-gprune-16", "tiny-llava-none"]
    assert main(["demo", "--model", "tiny-llava", "--keep", "16", "--cache-dir", str(cache_dir)]) == 0  # reuses
    assert "exporting" not in capsys.readouterr().err
