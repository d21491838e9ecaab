"""One checkpoint naming and discovery scheme (ist_accel.checkpoint), and the save/load
agreements in a single process (no process group: a world of one)."""

import errno

import pytest
import torch

from ist_accel import checkpoint


def _complete(folder):
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"x")
    checkpoint.write_manifest(folder, {"step": 0, "world_size": 1})


def test_step_names_are_found_in_step_order_and_pruned(tmp_path):
    assert checkpoint.checkpoint_path(tmp_path, 20) == tmp_path / "checkpoints" / "step_00000020"
    for step in (100, 20, 5):
        _complete(checkpoint.checkpoint_path(tmp_path, step))
    (tmp_path / "checkpoints" / "step_00000200.partial").mkdir()  # an interrupted save
    (tmp_path / "checkpoints" / "step_00000300").mkdir()  # no manifest: not complete
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == \
        ["step_00000005", "step_00000020", "step_00000100"]
    checkpoint.prune_checkpoints(tmp_path, 0)  # 0: keep all
    assert len(checkpoint.complete_checkpoints(tmp_path)) == 3
    checkpoint.prune_checkpoints(tmp_path, 2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_00000020", "step_00000100"]


def test_older_checkpoint_n_folders_stay_resumable(tmp_path):
    for n in (2, 10):
        _complete(tmp_path / "checkpoints" / f"checkpoint_{n}")
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["checkpoint_2", "checkpoint_10"]
    _complete(checkpoint.checkpoint_path(tmp_path, 7))  # once a step_ folder exists, it is the scheme
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_00000007"]
    checkpoint.prune_checkpoints(tmp_path, 1)  # never removes the older scheme's folders
    assert (tmp_path / "checkpoints" / "checkpoint_2").is_dir()


def test_a_failed_save_raises_on_every_rank_and_removes_the_partial_folder(tmp_path):
    final = checkpoint.checkpoint_path(tmp_path, 8)
    partial = checkpoint.partial_path(final)
    partial.mkdir(parents=True)
    checkpoint.raise_unless_all_saved(None, final, partial)  # nobody failed: nothing happens
    assert partial.is_dir()
    with pytest.raises(checkpoint.CheckpointSaveError) as caught:
        checkpoint.raise_unless_all_saved(OSError(errno.ENOSPC, "No space left on device"), final, partial)
    assert not partial.exists()
    assert f"saving checkpoint {final} failed on rank(s) [0] (rank 0: OSError: [Errno 28] No space left" in \
        str(caught.value)
    assert "step_00000008.partial was removed and earlier checkpoints are untouched" in str(caught.value)
    assert caught.value.errno == errno.ENOSPC


def test_a_shape_problem_is_refused_naming_it(tmp_path):
    checkpoint.raise_unless_all_fit(None, tmp_path / "ist_rank0.pt")
    with pytest.raises(checkpoint.CheckpointError, match="has shape"):
        problem = checkpoint.shape_mismatch({"w": torch.zeros(2, 3)}, {"w": (2, 4)}, "subnet")
        checkpoint.raise_unless_all_fit(problem, tmp_path / "ist_rank0.pt")
