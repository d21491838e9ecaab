"""Reliability: ranks agree every round, non-finite updates never reach the global model,
a dead peer fails the others fast with a clear message, checkpoints are atomic and verified,
and a run killed at a random point resumes to the bit-identical result."""

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ist_accel.sharded import load_folder

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "workers"))
from common import batch_for, loss_fn, make_model  # noqa: E402
from launch import ROOT, WORKERS, accelerate_launch, free_port, torchrun  # noqa: E402

from ist_accel import ISTConfig, decompose  # noqa: E402
from ist_accel import checkpoint as ckpt  # noqa: E402
from ist_accel.reference import ReferenceIST  # noqa: E402

MNIST = ROOT.parent / "shared" / "datasets" / "mnist"
needs_mnist = pytest.mark.skipif(not MNIST.exists(), reason=f"real data missing: {MNIST} (../shared absent)")


def worker(tmp_path, extra, env=None, nproc=2, model="mlp"):
    return torchrun("ist_worker.py", nproc, ["--model", model, "--num-subnets", str(nproc), "--rounds", "3",
                                             "--local-steps", "2", "--out", str(tmp_path), *extra], env=env)


def test_ranks_that_disagree_stop_together_naming_the_field(tmp_path):
    proc = worker(tmp_path, ["--seed-rank-offset", "1"])  # rank 1 runs another seed
    assert proc.returncode != 0 and not (tmp_path / "global.pt").exists()
    assert proc.stderr.count("ISTAgreementError: ranks disagree on the config") == 2, proc.stderr[-3000:]


def test_nonfinite_update_raises_on_every_rank(tmp_path):
    proc = worker(tmp_path, ["--policy", "carry"], env={"IST_FAULT": "nan:rank=1:step=3"})
    assert proc.returncode != 0 and not (tmp_path / "global.pt").exists()
    assert proc.stderr.count("ISTNonFiniteError: round 1 (step 4): subnet group(s) [1] hold NaN/Inf") == 2, \
        proc.stderr[-3000:]


@pytest.mark.parametrize("model", ["mlp", "resnet"])
def test_nonfinite_update_skipped_equals_reference_without_it(tmp_path, model):
    """Rank 1 is poisoned at step 3 (round 1): with nonfinite='skip' its round-1 update is
    dropped; the result equals the reference in which subnet 1 trains no step in round 1."""
    proc = worker(tmp_path, ["--policy", "carry", "--nonfinite", "skip"], env={"IST_FAULT": "nan:rank=1:step=3"},
                  model=model)
    assert (tmp_path / "global.pt").exists(), proc.stderr[-3000:]
    assert "subnet group(s) [1] hold NaN/Inf; their updates of this round are dropped" in proc.stderr
    got = torch.load(tmp_path / "global.pt")
    assert all(torch.isfinite(v).all() for v in got.values() if v.is_floating_point())
    torch.set_num_threads(1)
    ref_model = make_model(model)
    config = ISTConfig(num_subnets=2, local_steps=2, optimizer_state="carry", seed=5)
    ref = ReferenceIST(decompose(ref_model, config), lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), "carry")
    for r in range(3):
        steps = range(2 * r, 2 * r + 2)
        ref.run_round([[[batch_for(model, s, 0, t) for t in steps if not (s == 1 and r == 1)]] for s in range(2)],
                      loss_fn)
    for key, value in ref_model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_a_killed_peer_fails_the_others_fast_with_a_clear_message(tmp_path):
    """No torchrun watching: rank 1 is SIGKILLed mid-round; rank 0 must stop on its own at
    the next sync with ISTSyncError, well inside the timeout, not hang."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "IST_FAULT": "kill:rank=1:step=3"}
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKERS / "ist_worker.py"), "--model", "mlp", "--num-subnets", "2", "--rounds", "3",
             "--local-steps", "2", "--timeout", "120", "--out", str(tmp_path)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    started = time.monotonic()
    _, err0 = procs[0].communicate(timeout=110)
    elapsed = time.monotonic() - started
    procs[1].wait(timeout=30)
    assert procs[1].returncode == -9
    assert procs[0].returncode != 0 and "ISTSyncError: round 1 (step 4) failed on rank 0" in err0, err0[-3000:]
    assert "restart from the last checkpoint" in err0
    assert elapsed < 60, f"rank 0 took {elapsed:.0f} s to notice"


# ---- checkpoints ------------------------------------------------------------------------------------------

MLP_RUN = ["--hidden", "64", "64", "--max-steps", "40", "--local-steps", "5", "--checkpoint-every", "5",
           "--keep-checkpoints", "20", "--optimizer-state", "carry", "--schedule", "cosine"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    if not MNIST.exists():
        pytest.skip(f"real data missing: {MNIST}")
    out = tmp_path_factory.mktemp("whole")
    proc = accelerate_launch(ROOT / "recipes" / "ist_mlp.py", 2, ["--data", str(MNIST), *MLP_RUN, "--output-dir",
                                                                  str(out)])
    assert (out / "results.json").exists(), proc.stderr[-3000:]
    return out


def kill_runs() -> list[tuple[int, int, str]]:
    """(rank, step, point) kill points: a reduced count in CI; IST_KILL_RUNS=24 for the full drill."""
    rng = random.Random(2107)
    points = []
    for i in range(int(os.environ.get("IST_KILL_RUNS", "3"))):
        point = ("step", "sync", "save")[i % 3]  # mid-round, inside the exchange, half-way through a save
        step = rng.randrange(5, 40, 5) if point != "step" else rng.randrange(1, 40)
        points.append((rng.randrange(2), step, point))
    return points


@needs_mnist
@pytest.mark.parametrize("rank,step,point", kill_runs())
def test_killed_at_a_random_point_resumes_bit_identical(tmp_path, uninterrupted, rank, step, point):
    common = ["--data", str(MNIST), *MLP_RUN, "--output-dir", str(tmp_path)]
    proc = accelerate_launch(ROOT / "recipes" / "ist_mlp.py", 2, common,
                             env={"IST_FAULT": f"kill:rank={rank}:step={step}:point={point}"})
    assert proc.returncode != 0 and not (tmp_path / "results.json").exists()
    complete = [p for p in (tmp_path / "checkpoints").glob("step_*") if ckpt.is_complete(p)]
    last = max((int(p.name.split("_")[1]) for p in complete), default=0)
    assert last >= step - 5, f"killed at step {step} ({point}) but the last complete checkpoint is step {last}"
    proc = accelerate_launch(ROOT / "recipes" / "ist_mlp.py", 2, [*common, "--resume", "auto"])
    assert (tmp_path / "results.json").exists(), proc.stderr[-3000:]
    assert (f"resuming from {tmp_path / 'checkpoints'}/step_{last:08d}" in proc.stderr) or last == 0
    a, b = load_folder(uninterrupted / "model"), load_folder(tmp_path / "model")
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after kill at step {step} ({point}) and resume"


@needs_mnist
def test_damaged_or_foreign_checkpoints_are_refused(tmp_path, uninterrupted):
    source = uninterrupted / "checkpoints" / "step_00000020"
    truncated = tmp_path / "truncated"
    shutil.copytree(source, truncated)
    state = truncated / "ist_rank1.pt"
    state.write_bytes(state.read_bytes()[:100])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"not a checkpoint")
    for folder, message in [(truncated, "ist_rank1.pt has 100 bytes, the manifest says"),
                            (foreign, "is not a complete ist_accel checkpoint (no MANIFEST.json)")]:
        out = tmp_path / f"out_{folder.name}"
        proc = accelerate_launch(ROOT / "recipes" / "ist_mlp.py", 2, ["--data", str(MNIST), *MLP_RUN, "--output-dir",
                                                                      str(out), "--resume", str(folder)])
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-3000:]
        assert not (out / "results.json").exists()


def test_checkpoint_manifest_catches_every_kind_of_damage(tmp_path):
    folder = tmp_path / "step_1"
    partial = ckpt.partial_path(folder)
    partial.mkdir()
    (partial / "a.bin").write_bytes(b"x" * 1000)
    (partial / "b.json").write_text("{}")
    with pytest.raises(ckpt.CheckpointError, match="no MANIFEST.json"):
        ckpt.verify(partial)
    ckpt.write_manifest(partial, {"step": 1})
    ckpt.publish(partial, folder)
    assert not partial.exists() and ckpt.verify(folder)["step"] == 1 and ckpt.is_complete(folder)
    (folder / "a.bin").write_bytes(b"y" * 1000)  # same size, other bytes
    with pytest.raises(ckpt.CheckpointError, match="a.bin does not match its SHA-256"):
        ckpt.verify(folder)
    (folder / "a.bin").unlink()
    with pytest.raises(ckpt.CheckpointError, match="a.bin is missing"):
        ckpt.verify(folder)
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    (folder / "MANIFEST.json").write_text(json.dumps({**manifest, "format": "other/9"}))
    with pytest.raises(ckpt.CheckpointError, match="checkpoint format 'other/9'"):
        ckpt.verify(folder)
    # publishing over an existing checkpoint replaces it whole
    again = ckpt.partial_path(folder)
    again.mkdir()
    (again / "c.bin").write_bytes(b"z")
    ckpt.write_manifest(again, {"step": 2})
    ckpt.publish(again, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["MANIFEST.json", "c.bin"]
