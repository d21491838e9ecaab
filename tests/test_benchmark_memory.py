"""benchmarks/memory.py (small in CI): IST's per-rank tensors, counted from outside the engine
by walking the workers' live tensors, are what ``ist-accel plan`` predicts, a fraction of
DDP's; the harness's watchdog kills a run over its cap and reports it."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "mnist"
sys.path.insert(0, str(ROOT / "benchmarks"))

pytestmark = pytest.mark.skipif(not DATA.exists(), reason=f"MNIST not found at {DATA} (../shared/datasets)")


@pytest.mark.long
def test_memory_benchmark_counts_what_the_planner_predicts_and_enforces_its_cap(tmp_path):
    import memory

    hidden = ["1536", "1536", "1536"]
    common = ["--hidden", *hidden, "--workers", "2", "--steps", "12", "--local-steps", "4", "--eval-samples", "200",
              "--runs", str(tmp_path / "runs")]
    result = memory.main([*common, "--methods", "ist", "ddp", "--cap-mib", "8000", "--json", str(tmp_path / "m.json")])
    assert json.loads((tmp_path / "m.json").read_text())["methods"].keys() == {"ist", "ddp"}
    ist, ddp = result["methods"]["ist"], result["methods"]["ddp"]
    assert ist["ok"] and ddp["ok"], (ist["error"], ddp["error"])
    # measured (live tensors) against predicted (the planner), per rank
    for live, predicted in zip(ist["live_tensor_bytes"], result["predicted_rank_bytes"]):
        assert abs(live / predicted - 1) < 0.10, (live, predicted)
    # DDP holds parameters + gradients + momentum of the whole model (and its gradient buckets)
    whole = result["model_params"] * 4
    assert all(x >= 3 * whole for x in ddp["live_tensor_bytes"])
    assert all(i < 0.6 * d for i, d in zip(ist["live_tensor_bytes"], ddp["live_tensor_bytes"]))
    assert all(p > 0 for p in ist["peak_rss_bytes"]) and ist["steps"] == 12
    # the watchdog: a cap under the runtime's own footprint ends the run, reported, not crashed
    capped = memory.main([*common, "--methods", "ddp", "--cap-mib", "200"])["methods"]["ddp"]
    assert not capped["ok"] and "went over the cap" in capped["error"] and "200 MiB" in capped["error"]
