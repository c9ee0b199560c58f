"""benchmarks/loaded_machine.py runs as documented on a tiny setting: a slice of the sample with a fast
config, one run idle and one beside a busy loop. The figures are measurements, not asserted; what is
checked is that both conditions ran, their times were taken, the outputs were compared, and no busy
loop outlives the script."""
from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.conftest import ROOT


def test_loaded_machine_benchmark_prints_wall_and_cpu_per_condition(slice_files, tmp_path):
    report = tmp_path / "loaded.json"
    proc = subprocess.run([sys.executable, "benchmarks/loaded_machine.py", "--data", str(slice_files / "train.csv"),
                           "--config", str(slice_files / "config.json"), "--busy", "1", "--runs", "1",
                           "--workdir", str(tmp_path / "work"), "--json", str(report)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    for condition in ("idle", "1 busy loop"):
        wall, cpu = re.search(rf"^passive\s+{condition}\s+1\s+([\d.]+)\s+[\d.]+-[\d.]+\s+([\d.]+)\s+yes$",
                              out, re.M).groups()
        assert float(wall) > 0 and float(cpu) > 0, out
    assert re.search(r"^passive: 1 busy: wall [\d.]+x idle", out, re.M), out
    rows = json.loads(report.read_text())["rows"]
    assert [(r["wait"], r["busy"], r["identical"]) for r in rows] == [("passive", 0, True), ("passive", 1, True)]
    # the busy loops (their command lines carry the workdir) were stopped
    loops = subprocess.run(["pgrep", "-f", str(tmp_path / "work")], capture_output=True, text=True).stdout.split()
    assert not loops
