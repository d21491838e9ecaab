"""benchmarks/exchange.py runs and its counted bytes meet the bar (small models in CI)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "exchange.py"


@pytest.mark.parametrize("model,S,workers", [("preact_resnet56", 4, 4), ("mlp", 2, 2), ("preact_resnet32", 2, 4)])
def test_exchange_benchmark(tmp_path, model, S, workers):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", model, "--num-subnets", str(S), "--workers",
                           str(workers), "--rounds", "2", "--hidden", "256,256", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert out.exists(), proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert f"| {model} | {S} x {workers // S} | fp32 |" in proc.stdout
    for key in ("check_seconds", "pack_seconds", "wire_seconds", "unpack_seconds", "plan_seconds", "allreduce_seconds"):
        assert r[key] >= 0
    assert r["ist_sync_seconds"] > 0 and r["plan_bytes"] >= 0
    for key in ("ist_bytes_sent_per_worker", "allreduce_bytes_sent_per_worker", "lower_bound_bytes_per_worker"):
        assert r[key] > 0
    assert r["ist_bytes_sent_per_worker"] <= 1.10 * r["lower_bound_bytes_per_worker"]
    assert r["ist_bytes_sent_per_worker"] < r["allreduce_bytes_sent_per_worker"]
