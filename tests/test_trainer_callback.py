"""``Trainer(..., callbacks=[ISTCallback(...)])`` trains IST: transformers' run_clm.py flow
(tests/workers/run_clm.py) under torchrun with every setting on the command line, as users
run it. IST happened (the cross-group bytes are a fraction of the whole model's all-reduce,
each rank trains a subnet), the script ends with rc 0 (save_model, save_state, predict,
create_model_card), load_best_model_at_end loads the best checkpoint's model, and a run
resumed from a checkpoint continues exactly."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from launch import torchrun  # noqa: E402
from test_lm_recipe import write_corpus  # noqa: E402

from ist_accel.accounting import ring_allreduce_bytes  # noqa: E402
from ist_accel.sharded import load_folder  # noqa: E402

STEPS, SAVE = 20, 10


def run_clm(out: Path, data: Path, *extra: str):
    args = ["--train_file", str(data / "train.txt"), "--validation_file", str(data / "valid.txt"),
            "--output_dir", str(out), "--do_train", "--do_eval", "--use_cpu", "--max_steps", str(STEPS),
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--learning_rate", "0.003",
            "--lr_scheduler_type", "cosine", "--save_strategy", "steps", "--save_steps", str(SAVE),
            "--eval_strategy", "steps", "--eval_steps", str(SAVE), "--logging_steps", "5",
            # the *worst* checkpoint is "best": its model differs from the last step's, so loading it shows
            "--load_best_model_at_end", "--metric_for_best_model", "eval_loss", "--greater_is_better", "True",
            "--report_to", "none", "--disable_tqdm", "True", "--seed", "1", *extra]
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(out.parent / "hf-cache"),
           "IST_NUM_SUBNETS": "2", "IST_LOCAL_STEPS": "5"}
    return torchrun("run_clm.py", 2, args, timeout=600, env=env)


def assert_same_tensors(x, y, where: str) -> int:
    """Every tensor in ``x`` (nested dicts and lists; not the timing totals) equals ``y``'s."""
    if isinstance(x, torch.Tensor):
        torch.testing.assert_close(y, x, rtol=0, atol=0, msg=lambda m: f"{where}: {m}")
        return 1
    if isinstance(x, dict):
        return sum(assert_same_tensors(v, y[k], f"{where}/{k}") for k, v in x.items() if k != "totals")
    if isinstance(x, (list, tuple)):
        return sum(assert_same_tensors(v, w, f"{where}/{i}") for i, (v, w) in enumerate(zip(x, y)))
    return 0


def test_run_clm_with_the_callback_trains_ist_saves_and_resumes_exactly(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_corpus(data / "train.txt", 600, seed=0)
    write_corpus(data / "valid.txt", 60, seed=1)
    first = run_clm(tmp_path / "a", data)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-5000:]
    a = tmp_path / "a"
    state = json.loads((a / "trainer_state.json").read_text())
    logs = state["log_history"]
    # IST ran: every optimizer step in a round, the rounds' bytes a fraction of DDP's all-reduces
    ist_logs = [e for e in logs if "ist/round" in e]
    assert ist_logs and max(e["ist/round"] for e in ist_logs) == STEPS // 5 - 1  # rounds 0..3 (0-based)
    model = json.loads((a / "model_results.json").read_text())
    assert model["trainer_class"] == "ISTTrainer" and model["n_layer"] == 4
    whole = model["num_parameters"]
    assert all(e["ist/subnet_params"] < 0.8 * whole for e in ist_logs)
    sent = max(e["ist/bytes_sent_total"] for e in ist_logs)
    ddp = STEPS * ring_allreduce_bytes(whole * 4, 2)  # an fp32 all-reduce of the whole model every step
    assert 0 < sent < 0.5 * ddp
    # the global model's parameter count, from the model config (tied lm_head counted once)
    config = json.loads((a / "config.json").read_text())
    e, v, p = config["n_embd"], config["vocab_size"], config["n_positions"]
    per_block = 2 * 2 * e + (e * 3 * e + 3 * e) + (e * e + e) + (e * 4 * e + 4 * e) + (4 * e * e + e)
    assert whole == v * e + p * e + config["n_layer"] * per_block + 2 * e
    # load_best_model_at_end (greater_is_better: the step-10 checkpoint) -> evaluate() scores that model
    evals = {e["step"]: e["eval_loss"] for e in logs if "eval_loss" in e}
    assert set(evals) == {SAVE, STEPS} and evals[SAVE] > evals[STEPS]  # it learned, and 10 is the "best"
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{SAVE}")
    final = json.loads((a / "eval_results.json").read_text())
    assert final["eval_loss"] == pytest.approx(evals[SAVE], rel=1e-6)
    assert final["predict_loss"] == pytest.approx(final["eval_loss"], rel=1e-6)
    # the exported model is a Hugging Face folder: from_pretrained reads it, tokenizer and card beside
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(a)
    assert loaded.num_parameters() == whole
    assert (a / "tokenizer.json").exists() and "base_model: gpt2-tiny" in (a / "README.md").read_text()
    assert sorted(p.name for p in (a / f"checkpoint-{SAVE}").glob("ist_rank*.pt")) == ["ist_rank0.pt", "ist_rank1.pt"]

    # a second run resumed from the step-10 checkpoint: its step-20 state is the first run's
    second = run_clm(tmp_path / "b", data, "--resume_from_checkpoint", str(a / f"checkpoint-{SAVE}"))
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-5000:]
    b_logs = json.loads((tmp_path / "b" / "trainer_state.json").read_text())["log_history"]
    assert [e["eval_loss"] for e in b_logs if e.get("step") == STEPS and "eval_loss" in e] == [evals[STEPS]]
    for rank in range(2):
        x = torch.load(a / f"checkpoint-{STEPS}" / f"ist_rank{rank}.pt", weights_only=True)
        y = torch.load(tmp_path / "b" / f"checkpoint-{STEPS}" / f"ist_rank{rank}.pt", weights_only=True)
        assert (x["round"], x["steps"]) == (y["round"], y["steps"]) == (STEPS // 5, STEPS)
        assert assert_same_tensors(x, y, f"rank {rank}") > 10  # subnet, optimizer state, owner shards
    assert load_folder(tmp_path / "b").keys() == load_folder(a).keys()
