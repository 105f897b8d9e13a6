"""Smoke test of benchmarks/ntk_benchmark.py: tiny sizes, torch only, no timings."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "ntk_benchmark.py"


def test_quick_benchmark_prints_and_writes_a_table(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--no-nt",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| case | method | median s |" in proc.stdout
    assert "## Targets (issue 3)" in proc.stdout
    assert (tmp_path / "ntk_benchmark_quick.md").read_text() in proc.stdout

    rows = json.loads((tmp_path / "ntk_benchmark_quick.json").read_text())["rows"]
    cases = {r["case"] for r in rows}
    assert cases == {
        "mlp-w16-n6-full",
        "mlp-w16-n6-trace",
        "cnn-c4-n5-full",
        "cnn-c4-n5-trace",
    }
    for row in rows:
        if row["method"].startswith("nt-"):
            assert row["skipped"] == "--no-nt"
            continue
        if row["method"] != "ntkcl-auto" and "skipped" in row:
            # an explicit ntkcl implementation that auto already ran
            assert row["method"].startswith("ntkcl-"), row
            continue
        # every other torch method ran and agrees with the float64 reference
        assert "error" not in row, row
        assert row["seconds"] > 0
        assert row["max_rel_diff"] < 1e-5, row
    assert "dump s" in proc.stdout  # the share of NTK dumps in training
