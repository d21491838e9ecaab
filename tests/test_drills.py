"""Drills run from outside, as a user would meet the failures (issue 15): real processes,
real signals, real files. A stalled (SIGSTOPped) peer ends the others with ISTSyncError
within sync_timeout, whatever created the process group; the exported model scores what
the run reported; bad input is a one-line error before any process group; workers exit
when their launcher is SIGKILLed; a failed save removes its .partial and says why;
``--resume auto`` falls back past a damaged checkpoint; trackers never see IST's steps
going backwards, and the loop's own metrics are kept."""

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ist_accel.sharded import load_folder

sys.path.insert(0, str(Path(__file__).parent))
from launch import CPU_CONFIG, ROOT, accelerate_launch, free_port, torchrun  # noqa: E402

from ist_accel import checkpoint as ckpt  # noqa: E402

MNIST = ROOT.parent / "shared" / "datasets" / "mnist"
RECIPES = ROOT / "recipes"
needs_mnist = pytest.mark.skipif(not MNIST.exists(), reason=f"real data missing: {MNIST} (../shared absent)")
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def start(script: Path, args: list[str], log: Path, env: dict | None = None, nproc: int = 2) -> subprocess.Popen:
    """``accelerate launch`` of a recipe in the background, stdout and stderr into ``log``."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG), "--num_processes",
           str(nproc), "--main_process_port", str(free_port()), str(script), *map(str, args)]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **ENV, **(env or {})})


def run(script: Path, args: list[str], env: dict | None = None, timeout: float = 600) -> tuple[int, str]:
    """``accelerate launch`` of a recipe on 2 ranks to its end (Accelerate's launch command in the
    warm zygote, tests/zygote.py); ``start`` launches the command itself, for drills that signal it."""
    proc = accelerate_launch(script, 2, list(map(str, args)), timeout=timeout, env={**ENV, **(env or {})})
    return proc.returncode, proc.stdout + proc.stderr


def wait_for(log: Path, pattern: str, timeout: float, proc: subprocess.Popen | None = None) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} in the log after {timeout} s:\n{log.read_text(errors='replace')[-4000:]}")


def alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill(pids) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ---- 1. sync_timeout reaches every process group -------------------------------------------------------------


@needs_mnist
def test_a_stopped_peer_ends_the_run_with_ISTSyncError_within_sync_timeout(tmp_path):
    """Rank 1 SIGSTOPs itself mid-round (alive, sockets open, silent); rank 0 must give up at
    the round's sync after --sync-timeout (4 s) with ISTSyncError, not after gloo's 30 min."""
    log = tmp_path / "log.txt"
    proc = start(RECIPES / "ist_mlp.py", ["--data", MNIST, "--hidden", "64", "64", "--max-steps", "400",
                                          "--local-steps", "10", "--sync-timeout", "4", "--output-dir", tmp_path / "out"],
                 log, env={"IST_FAULT": "stop:rank=1:step=15"})
    stopped = None
    try:
        found = wait_for(log, r"IST_FAULT: stop on rank 1 at step 15 \(step\), pid (\d+)", 240, proc)
        stopped, since = int(found[1]), time.monotonic()
        wait_for(log, r"ist_accel\.recipe\.\w+: ISTSyncError", 4 + 30, proc)
        elapsed = time.monotonic() - since
    finally:
        kill([stopped] if stopped else [])
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = log.read_text(errors="replace")
    assert 3.6 <= elapsed <= 4 + 5, f"rank 0 gave up {elapsed:.1f} s after rank 1 stopped (sync_timeout 4 s)"
    assert proc.returncode != 0 and not (tmp_path / "out" / "results.json").exists()
    assert re.search(r"[Tt]imed? ?out", text), text[-3000:]
    print(f"ISTSyncError {elapsed:.2f} s after SIGSTOP (sync_timeout 4 s)")


@pytest.mark.parametrize("mode", ["trainer", "deepspeed", "user"])
def test_sync_timeout_reaches_a_default_group_created_elsewhere(tmp_path, mode, request):
    """The default group made by TrainingArguments (use_cpu: torch's 30-minute gloo default), by
    DeepSpeed's init_distributed (its own default, here DEEPSPEED_TIMEOUT=30 minutes), or by the
    user's own init_process_group, gets sync_timeout; 600 s is the value Accelerate's
    InitProcessGroupKwargs.to_kwargs() used to drop."""
    env = {"HF_HUB_OFFLINE": "1"}
    if mode == "deepspeed":
        request.getfixturevalue("deepspeed_cpu_comm_op")
        env["DEEPSPEED_TIMEOUT"] = "30"
    proc = torchrun("timeout_worker.py", 2, ["--mode", mode, "--timeout", "600", "--out", str(tmp_path)],
                    env=env, timeout=300)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)
               if (tmp_path / f"rank{r}.json").exists()]
    assert len(results) == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    for r in results:
        assert r["world"] == 2 and r["after"] and set(r["after"]) == {600.0}, r
        if mode != "deepspeed":
            assert set(r["before"]) == {1800.0}, r  # what the group had before ISTAccelerator set it


# ---- 4. the exported model is the evaluated one; 6/7c: checkpoints of another width, damaged checkpoints ------

MLP_RUN = ["--data", MNIST, "--hidden", "128", "128", "--max-steps", "200", "--local-steps", "20",
           "--checkpoint-every", "40", "--keep-checkpoints", "10", "--schedule", "cosine"]


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    if not MNIST.exists():
        pytest.skip(f"real data missing: {MNIST}")
    out = tmp_path_factory.mktemp("mlp")
    code, text = run(RECIPES / "ist_mlp.py", [*MLP_RUN, "--output-dir", out])
    assert (out / "results.json").exists(), text[-4000:]
    return out


@needs_mnist
def test_exported_model_in_the_plain_architecture_scores_the_reported_accuracy(mlp_run):
    from ist_accel.data import load_mnist
    from ist_accel.models import MLP

    reported = json.loads((mlp_run / "results.json").read_text())["final_accuracy"]
    _, test = load_mnist(MNIST)

    def accuracy(state) -> float:
        model = MLP(784, [128, 128], 10, norm="batch")
        model.load_state_dict(state)
        model.eval()
        loader = torch.utils.data.DataLoader(test, batch_size=1000)
        with torch.no_grad():
            correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in loader)
        return correct / len(test)

    export = load_folder(mlp_run / "model")
    raw = load_folder(mlp_run / "checkpoints" / "step_00000200")  # the training values
    exported, unfolded = accuracy(export), accuracy(raw)
    print(f"reported {reported:.4f}, exported model {exported:.4f}, raw training weights {unfolded:.4f}")
    assert abs(exported - reported) * len(test) <= 1, (exported, reported)
    # checkpoints keep the raw values (resume stays exact); the export folds the 1/S input scaling in
    torch.testing.assert_close(export["4.weight"], raw["4.weight"] / 2)
    torch.testing.assert_close(export["1.weight"], raw["1.weight"])


@needs_mnist
def test_resume_auto_falls_back_past_a_damaged_checkpoint(tmp_path, mlp_run):
    """Checkpoints up to step 120, the newest one damaged: --resume auto warns naming it,
    resumes from step 80 and ends with the uninterrupted run's model, bit for bit."""
    out = tmp_path / "cut"
    (out / "checkpoints").mkdir(parents=True)
    for step in (40, 80, 120):
        shutil.copytree(mlp_run / "checkpoints" / f"step_{step:08d}", out / "checkpoints" / f"step_{step:08d}")
    damaged = out / "checkpoints" / "step_00000120"
    state = damaged / "ist_rank0.pt"
    state.write_bytes(state.read_bytes()[:1000])
    code, text = run(RECIPES / "ist_mlp.py", [*MLP_RUN, "--output-dir", out, "--resume", "auto"])
    assert (out / "results.json").exists(), text[-4000:]
    assert f"skipping the damaged checkpoint {damaged}" in text and "ist_rank0.pt has 1000 bytes" in text
    assert f"resuming from {out / 'checkpoints' / 'step_00000080'}" in text
    a, b = load_folder(mlp_run / "model"), load_folder(out / "model")
    for key in a:
        assert torch.equal(a[key], b[key]), key


@needs_mnist
def test_a_checkpoint_of_another_width_is_refused_naming_the_tensor_and_shapes(tmp_path, mlp_run):
    source = mlp_run / "checkpoints" / "step_00000080"
    other = [a if a != "128" else "64" for a in MLP_RUN]
    code, text = run(RECIPES / "ist_mlp.py", [*other, "--output-dir", tmp_path / "out", "--resume", source])
    assert code != 0 and not (tmp_path / "out" / "results.json").exists()
    assert "subnet tensor '1.weight' has shape (64, 784) in the checkpoint but (32, 784) in this run" in text, \
        text[-3000:]
    assert "must match" not in text  # not torch's raw size error


# ---- 6. bad input up front ----------------------------------------------------------------------------------


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), RECIPES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BAD = [
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lr", "-0.1"], "--lr must be a finite number > 0, got -0.1"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--momentum", "nan"], "--momentum must be a finite number in [0, 1), got nan"),
    (["--momentum", "1"], "--momentum must be a finite number in [0, 1), got 1.0"),
    (["--momentum", "-0.5"], "--momentum must be a finite number in [0, 1), got -0.5"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
    (["--weight-decay=-1e-4"], "--weight-decay must be a finite number >= 0, got -0.0001"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0, got inf"),
    (["--sync-timeout", "0"], "--sync-timeout must be a finite number of seconds > 0, got 0.0"),
    (["--sync-timeout", "inf"], "--sync-timeout must be a finite number of seconds > 0, got inf"),
    (["--data", "/no/such/folder"], "--data /no/such/folder: no such file or folder"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_numbers_and_missing_data_are_one_line_errors_before_any_process_group(tmp_path, args, message):
    import torch.distributed as dist

    recipe = _recipe("resist_cifar.py")
    with pytest.raises(SystemExit) as error:
        recipe.parse_args([*args, "--output-dir", str(tmp_path / "never")])
    assert message in str(error.value)
    assert not dist.is_initialized() and not (tmp_path / "never").exists()


def test_zero_momentum_and_weight_decay_stay_valid(tmp_path):
    args = _recipe("resist_cifar.py").parse_args(["--momentum", "0", "--weight-decay", "0", "--output-dir",
                                                  str(tmp_path / "o")])
    assert (args.momentum, args.weight_decay) == (0.0, 0.0)


def test_output_dirs_that_cannot_be_written_are_refused_leaving_nothing_behind(tmp_path):
    recipe = _recipe("ist_mlp.py")
    data = str(tmp_path)  # exists; never read here
    a_file = tmp_path / "results.txt"
    a_file.write_text("x")
    cases = [(a_file, f"--output-dir {a_file} is an existing file, not a folder"),
             (a_file / "out", f"--output-dir {a_file / 'out'} cannot be created: {a_file} is a file"),
             (Path("/proc/ist_accel_out"), "--output-dir /proc/ist_accel_out cannot be written")]
    if os.geteuid() != 0:  # root writes into a read-only (mode 555) folder anyway
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        cases.append((locked / "out", f"--output-dir {locked / 'out'} cannot be written"))
    before = sorted(p.name for p in tmp_path.iterdir())
    for path, message in cases:
        with pytest.raises(SystemExit) as error:
            recipe.parse_args(["--data", data, "--output-dir", str(path)])
        assert message in str(error.value), str(error.value)
    fine = tmp_path / "new" / "deeper"
    recipe.parse_args(["--data", data, "--output-dir", str(fine)])
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not fine.parent.exists()  # the probe is gone


def test_a_missing_data_folder_is_one_line_on_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, str(RECIPES / "ist_mlp.py"), "--data", str(tmp_path / "nope"),
                           "--output-dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"--data {tmp_path / 'nope'}: no such file or folder")


def _image_folder(root: Path) -> Path:
    """A tiny ImageFolder (2 classes of 8x8 PNGs) with one truncated JPEG and one stray text file."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("test", 4)):
        for c, name in enumerate(("dark", "light")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray((rng.integers(0, 100, (8, 8, 3)) + 120 * c).astype("uint8")).save(folder / f"{i}.png")
    bad = root / "train" / "dark" / "bad.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3)).astype("uint8")).save(bad, quality=95)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    (root / "train" / "light" / "notes.txt").write_text("not an image")
    return bad


def test_an_undecodable_image_stops_every_rank_naming_the_file(tmp_path):
    """A rank meets the truncated JPEG; it fails naming the file, and the other rank stops with
    the same message (ISTPeerFailure), not 'Connection closed by peer'. The stray text file is
    named in a warning."""
    bad = _image_folder(tmp_path / "data")
    code, text = run(RECIPES / "resist_imagenet.py", ["--data", tmp_path / "data", "--arch", "preact_resnet20",
                                                      "--augment", "cifar", "--image-size", "8", "--batch-size", "4",
                                                      "--max-steps", "40", "--local-steps", "40", "--output-dir",
                                                      tmp_path / "out"])
    assert code != 0 and not (tmp_path / "out" / "results.json").exists()
    named = rf"ImageDecodeError: cannot decode image {re.escape(str(bad))}: \w+Error: "
    for rank in (0, 1):  # its own error, or the peer's: each rank's final error names the file
        assert re.search(rf"\[rank{rank}\]: ist_accel\.(data\.images\.|faults\.ISTPeerFailure: stopping: another rank "
                         rf"failed \(rank \d: ){named}", text), text[-4000:]
    # usually one rank meets the image and the other stops on its message (both may meet it: the
    # ranks run apart between syncs, and one may read the image in a later epoch before it checks)
    assert "skipped 1 file(s) that are not images" in text and str(tmp_path / "data" / "train" / "light" / "notes.txt") \
        in text


# ---- 7. operations ----------------------------------------------------------------------------------------------


@needs_mnist
def test_workers_exit_when_their_launcher_is_killed(tmp_path):
    import psutil

    log = tmp_path / "log.txt"
    proc = start(RECIPES / "ist_mlp.py", ["--data", MNIST, "--hidden", "64", "64", "--max-steps", "100000",
                                          "--local-steps", "10", "--output-dir", tmp_path / "out"], log)
    workers: list[int] = []
    try:
        wait_for(log, r"ist: +\d+%", 240, proc)  # training under way
        workers = [p.pid for p in psutil.Process(proc.pid).children(recursive=True) if "ist_mlp.py" in " ".join(p.cmdline())]
        assert len(workers) == 2, workers
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        while any(alive(pid) for pid in workers) and time.monotonic() - killed < 20:
            time.sleep(0.05)
        gone = time.monotonic() - killed
    finally:
        kill([proc.pid, *workers])
        proc.wait(timeout=30)
    assert not any(alive(pid) for pid in workers), "workers still training after their launcher died"
    assert gone < 5, f"the workers took {gone:.1f} s to exit"
    print(f"orphaned workers gone {gone:.2f} s after the launcher was SIGKILLed")


SAVE_RUN = ["--data", MNIST, "--hidden", "64", "64", "--max-steps", "60", "--local-steps", "10", "--checkpoint-every",
            "10", "--keep-checkpoints", "10"]


def _check_failed_save(out: Path, text: str, step: int) -> None:
    root = out / "checkpoints"
    assert not list(root.glob("*.partial")), sorted(p.name for p in root.iterdir())
    assert not (out / "results.json").exists()
    complete = sorted(p for p in root.glob("step_*"))
    assert complete and all(ckpt.verify(p) for p in complete)  # earlier checkpoints untouched
    message = f"ist_accel.checkpoint.CheckpointSaveError: saving checkpoint {root / f'step_{step:08d}'} failed on rank"
    assert text.count(message) == 2, text[-4000:]  # every rank stops, saying why
    assert f"step_{step:08d}.partial was removed and earlier checkpoints are untouched" in text


@needs_mnist
def test_a_save_on_a_full_disk_removes_its_partial_and_says_why(tmp_path):
    """Deterministic: rank 1 fails with ENOSPC half-way through the step-20 checkpoint."""
    out = tmp_path / "out"
    code, text = run(RECIPES / "ist_mlp.py", [*SAVE_RUN, "--output-dir", out],
                     env={"IST_FAULT": "enospc:rank=1:step=20:point=save"})
    assert code != 0
    _check_failed_save(out, text, 20)
    assert "failed on rank(s) [1] (rank 1: OSError: [Errno 28] No space left on device" in text, text[-4000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000010"]


@needs_mnist
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_save_on_a_real_full_tmpfs_removes_its_partial_and_says_why(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        code, text = run(RECIPES / "ist_mlp.py", [*SAVE_RUN, "--output-dir", disk])
        assert code != 0
        found = re.search(r"saving checkpoint \S+step_(\d+) failed", text)
        assert found, text[-4000:]
        _check_failed_save(disk, text, int(found[1]))
        assert "the disk is full" in text, text[-4000:]
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_tracker_steps_follow_the_loop_across_a_resume_and_keep_its_metrics(tmp_path):
    """The loop logs once per epoch at step=epoch; IST's round metrics (two rounds per epoch)
    go out at the loop's steps, so a W&B-like tracker drops nothing, before or after resuming."""
    for phase in ("first", "resume"):
        proc = torchrun("steps_worker.py", 2, ["--phase", phase, "--out", str(tmp_path)])
        assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((tmp_path / "tracker.json").read_text())
    assert data["drops"] == [], data["drops"][:5]
    steps = [entry["step"] for entry in data["logs"]]
    assert steps == sorted(steps)
    epochs = [entry["values"]["epoch"] for entry in data["logs"] if "train/loss" in entry["values"]]
    assert epochs == [0, 1, 2, 3]
    rounds = [entry["values"]["ist/round"] for entry in data["logs"] if "ist/round" in entry["values"]]
    assert rounds == list(range(8))
