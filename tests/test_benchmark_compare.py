"""benchmarks/compare.py runs DDP, Accelerate's LocalSGD and IST side by side on real data
(MNIST, 2 processes, a short budget) and writes its table, JSON and plots."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT.parent / "shared" / "datasets" / "mnist"


@pytest.mark.long
@pytest.mark.skipif(not MNIST.exists(), reason=f"real data missing: {MNIST} (../shared absent)")
def test_compare_runs_three_methods_and_reports(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("compare", ROOT / "benchmarks" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = ["--task", "mnist", "--num-subnets", "2", "--epochs", "0.15", "--local-steps", "5", "--eval-every", "10",
            "--batch-size", "64", "--ist-args=--optimizer-state=carry", "--out", str(tmp_path), "--", "--hidden", "64",
            "64"]
    summary = compare.main(argv)
    assert json.loads((tmp_path / "mnist_S2" / "runs" / "ist_seed0" / "results.json").read_text()
                      )["ist_config"]["optimizer_state"] == "carry"  # --ist-args reach the ist runs only
    capsys.readouterr()
    again = compare.main(argv)  # the same commands again: runs reused, not rerun
    assert json.dumps(again["rows"]) == json.dumps(summary["rows"])
    assert capsys.readouterr().out.count("reusing") == 3
    out = tmp_path / "mnist_S2"
    rows = {r["method"]: r for r in summary["rows"]}
    assert set(rows) == {"ddp", "localsgd", "ist"}
    assert all(r["bytes_measured"] for r in rows.values())  # the wiretap counts the baselines too
    assert all(r["total_bytes_per_sample"][0] > r["bytes_per_sample"][0] for r in rows.values())
    assert rows["ist"]["measured_vs_lower"][0] <= 1.10
    # per sample: DDP all-reduces every step, LocalSGD every 5 steps, IST a fraction of the model every 5 steps
    assert rows["ddp"]["bytes_per_sample"][0] > rows["localsgd"]["bytes_per_sample"][0] > rows["ist"]["bytes_per_sample"][0]
    assert rows["ist"]["peak_state_elements"][0] < rows["ddp"]["peak_state_elements"][0]
    assert all(0.5 < a[0] <= 1 for a in (r["final_accuracy"] for r in rows.values()))
    table = (out / "table.md").read_text().splitlines()
    assert len(table) == 5 and table[2].startswith("| ddp |")
    assert json.loads((out / "results.json").read_text())["accuracy_target"] > 0.5
    assert (out / "accuracy_vs_bytes.png").stat().st_size > 1000 and (out / "accuracy_vs_time.png").stat().st_size > 1000

    # an IST variant as its own row beside plain IST, merged into the same table
    variant = argv[:12] + ["--methods", "ist", "--ist-name", "ist_outer", "--ist-args=--outer-lr=0.7",
                           "--ist-args=--outer-momentum=0.9", "--merge"] + argv[13:]
    with pytest.raises(SystemExit, match="other settings"):  # another budget is refused before any run
        compare.main(["0.3" if a == "0.15" else a for a in variant])
    capsys.readouterr()
    merged = compare.main(variant)
    printed = capsys.readouterr().out
    assert "merging ddp, localsgd, ist from" in printed and printed.count("reusing") == 0
    assert [r["method"] for r in merged["rows"]] == ["ddp", "localsgd", "ist", "ist_outer"]
    assert merged["rows"][2]["final_accuracy"] == rows["ist"]["final_accuracy"]  # the earlier plain IST row, kept
    config = json.loads((out / "runs" / "ist_outer_seed0" / "results.json").read_text())["ist_config"]
    assert (config["outer_lr"], config["outer_momentum"]) == (0.7, 0.9)
    assert len((out / "table.md").read_text().splitlines()) == 6


def load_compare():
    spec = importlib.util.spec_from_file_location("compare", ROOT / "benchmarks" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    return compare


def test_split_reaches_every_method_alike_and_is_recorded(tmp_path, monkeypatch):
    """--split: the same partition flags in every method's recipe command (none for iid, so earlier
    runs and folders stay as they were), its own folder, a top-level ``split`` in results.json."""
    compare = load_compare()
    commands = {}

    def fake_launch(task, method, seed, args, out):
        commands[method] = compare.recipe_command(task, method, seed, args, out)
        point = {"accuracy": 0.5, "compute_seconds": 1.0, "bytes_sent_per_worker": 10.0}
        return {"history": [point], "final_accuracy": 0.5, "bytes_sent_per_worker": 10.0, "samples_per_worker": 5,
                "rounds": 1, "bytes_lower_per_worker": 10.0, "bytes_measured": True, "peak_rss_mib": 1.0,
                "peak_state_elements": 1, "sync_seconds": 0.1}

    monkeypatch.setattr(compare, "launch", fake_launch)
    base = ["--task", "mnist", "--num-subnets", "4", "--local-steps", "5", "--eval-every", "5", "--out", str(tmp_path)]
    summary = compare.main([*base, "--split", "dirichlet:0.1", "--methods", "ddp", "ist"])
    assert summary["split"] == "dirichlet:0.1"
    assert json.loads((tmp_path / "mnist_S4_dirichlet0.1" / "results.json").read_text())["split"] == "dirichlet:0.1"
    for method in ("ddp", "ist"):
        line = " ".join(commands[method])
        assert "--split dirichlet:0.1 --split-seed 0" in line and f"--method {method}" in line
    assert compare.main(base)["split"] == "iid" and "--split" not in " ".join(commands["ist"])
    assert json.loads((tmp_path / "mnist_S4" / "results.json").read_text())["split"] == "iid"
    with pytest.raises(SystemExit, match="expected iid, dirichlet:ALPHA"):
        compare.main([*base, "--split", "dirichlet"])


def test_refresh_adds_the_wire_fields_and_models_ddp_where_it_was_not_run(tmp_path):
    """--refresh: rows again from the runs a folder holds; each row carries its wire dtype,
    overlap and bytes against DDP, DDP's ring all-reduce per step where DDP was not run."""
    compare = load_compare()
    point = {"accuracy": 0.5, "compute_seconds": 1.0, "bytes_sent_per_worker": 10.0}
    run = {"history": [point], "final_accuracy": 0.5, "bytes_sent_per_worker": 1000.0, "samples_per_worker": 100,
           "total_bytes_sent_per_worker": 4000.0, "rounds": 1, "bytes_lower_per_worker": 1000.0,
           "bytes_measured": True, "peak_rss_mib": 1.0, "peak_state_elements": 1, "sync_seconds": 0.1,
           "model_params": 250, "world_size": 4}
    folder = tmp_path / "mnist_S4"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({
        "task": "mnist", "bandwidth_gbps": 10.0, "batch_size": 5, "rows": [], "accuracy_target": 0.0,
        "runs": {"localsgd": [run], "ist": [{**run, "ist_config": {"wire_dtype": "bf16"}}]}}))
    compare.main(["--refresh", str(folder)])
    summary = json.loads((folder / "results.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    ddp = 2 * 3 / 4 * 4 * 250 / 5  # per step, over the batch: 300 bytes per sample
    assert rows["ist"]["bytes_vs_ddp"] == [pytest.approx(ddp / 10.0)]
    assert rows["ist"]["all_bytes_vs_ddp"] == [pytest.approx(ddp / 40.0)]
    assert rows["ist"]["ddp_bytes_from"] == "ring model"
    assert (rows["ist"]["wire_dtype"], rows["localsgd"]["wire_dtype"]) == ("bf16", "fp32")
    assert rows["ist"]["overlap"] is False
    assert summary["runs"]["ist"][0]["wire_dtype"] == "bf16" and "ist_config" not in summary["runs"]["ist"][0]
    assert "(vs ring model)" in (folder / "table.md").read_text()
