"""bench.py runs end to end on the CPU: a training step and a GRPO step, each a table row. Only
that it runs and what it reports are checked here; its timings are never a test assertion."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_training_and_grpo_benchmarks_run():
    out = subprocess.run([sys.executable, "bench.py", "--sizes", "--train-sizes", "110m",
                          "--grpo-sizes", "tiny", "--runs", "1", "--threads", "1",
                          "--train-tokens", "300", "--new-tokens", "8", "--grpo-samples", "2"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert any(row.startswith("| 110m, PVM at [1, 2, 4] width 128 | off |") for row in rows), rows
    assert any(row.startswith("| 110m, PVM at [1, 2, 4] width 128 | on |") for row in rows), rows
    assert any(row.startswith("| tiny | 2 x 8 |") for row in rows), rows
