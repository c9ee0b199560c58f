"""The CPU benchmark scripts run as documented and print their tables (on a slice, with a fast config).

The figures themselves are not asserted (they are measurements, not tests); what is checked is that
the scripts still work against the pipeline they measure and that what they print is computed, not
left blank.
"""
from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_quality_benchmark_prints_every_stage_and_the_nested_final(slice_files, tmp_path):
    out = _run("benchmarks/quality.py", "--data", str(slice_files / "train.csv"),
               "--config", str(slice_files / "config.json"), "--out", str(tmp_path / "q"))
    assert "300 rows" in out
    prior = float(re.search(r"class prior\s+([\d.]+)", out).group(1))
    assert abs(prior - 1.0986) < 0.05  # three classes, roughly balanced on this slice
    for stage in ("length_lr", "lgbm"):
        assert re.search(rf"^{stage}\b.*\s[\d.]+\s+[\d.]+\s+0\.\d{{3}}$", out, re.M), out
    lo, final, hi = (float(x) for x in re.search(
        r"final .*\(nested\)\s+([\d.]+).*interval ([\d.]+)-([\d.]+)", out).group(2, 1, 3))
    assert lo < final < hi


def test_speed_benchmark_prints_steps_wall_cpu_and_memory(slice_files, tmp_path):
    out = _run("benchmarks/speed.py", "--data", str(slice_files / "train.csv"), "--rows", "400",
               "--config", str(slice_files / "config.json"), "--workdir", str(tmp_path / "s"))
    steps = dict(re.findall(r"^(read|folds|ensemble|report|lgbm: features|length_lr: fold 0)\s+([\d.]+)$", out, re.M))
    assert set(steps) == {"read", "folds", "ensemble", "report", "lgbm: features", "length_lr: fold 0"}, out
    n, wall, cpu, peak, loss = re.search(r"^\s+(400)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", out, re.M).groups()
    assert float(wall) > 0 and float(peak) > 0.1 and 0.5 < float(loss) < 1.2
