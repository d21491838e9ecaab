"""ISTTrainer / ISTCallback: the HF Trainer (torchrun, use_cpu, gradient accumulation, lr
scheduler, evaluate, save, resume) trains a tiny GPT-2 with IST, equal to the reference."""

import json
import sys
from pathlib import Path

import pytest
import torch

from ist_accel.sharded import load_folder

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from common import make_model  # noqa: E402
from launch import torchrun  # noqa: E402
from trainer_worker import BATCH, token_set  # noqa: E402

from ist_accel import ISTConfig, decompose  # noqa: E402
from ist_accel.reference import ReferenceIST  # noqa: E402

STEPS, LOCAL, ACCUM = 6, 2, 2


def reference(S, G, policy, decomposition, linear=False):
    """The same rounds by hand. Accelerate shards the in-order batches over ranks: rank r's
    micro-batch j is global batch j*N + r. SGD as the Trainer builds it (optim="sgd"); the
    loss of a step is the Trainer's token-sum over its ACCUM micro-batches divided by the
    step's label count."""
    torch.set_num_threads(1)
    world = S * G
    items = token_set(STEPS * ACCUM * BATCH * world, 1)

    def batch(rank, j):
        rows = torch.stack([items[(j * world + rank) * BATCH + i]["input_ids"] for i in range(BATCH)])
        return rows

    def loss(model, micro):  # the Trainer's: summed token losses / the step's label count (num_items_in_batch)
        count = sum(x.numel() for x in micro)
        return sum(model(x, labels=x, use_cache=False, num_items_in_batch=count).loss for x in micro)

    model = make_model("gpt2")
    policy, _, outer = policy.partition("-")  # "reset-diloco": DiLoCo's outer step (issue 17)
    config = ISTConfig(num_subnets=S, group_size=G, local_steps=LOCAL, optimizer_state=policy,
                       decomposition=decomposition, seed=5,
                       **({"outer_lr": 0.7, "outer_momentum": 0.9, "outer_nesterov": True} if outer == "diloco" else {}))
    ref = ReferenceIST(decompose(model, config),
                       lambda p: torch.optim.SGD(p, lr=0.01), policy, outer=config.outer())
    if linear:  # the Trainer's default schedule: lr decays linearly to 0 over the run (no warm-up)
        for opt in ref.optimizers:
            counter = {"step": 0}

            def set_lr(o, args, kwargs, counter=counter):
                o.param_groups[0]["lr"] = 0.01 * (STEPS - counter["step"]) / STEPS
                counter["step"] += 1

            opt.register_step_pre_hook(set_lr)
    for r in range(STEPS // LOCAL):
        steps = range(r * LOCAL, (r + 1) * LOCAL)
        ref.run_round([[[[batch(s * G + g, t * ACCUM + k) for k in range(ACCUM)] for t in steps] for g in range(G)]
                       for s in range(S)], loss)
    return model, ref.decomposition


# route: ISTTrainer(ist_config=...), the user's own Trainer subclass + callbacks=[ISTCallback(...)], or that
# subclass built plain and handed to ist_accel.apply(trainer, config)
# (the same code; each layout, policy and ZeRO stage is covered by one route, both routes by both)
TRAINER_CASES = [(2, 1, "reset", "layers", "linear", 0, "callback"), (2, 1, "carry", "heads", "constant", 0, "trainer"),
                 (2, 2, "reset", "layers", "constant", 0, "callback"), (2, 1, "reset-diloco", "layers", "linear", 0, "callback"),
                 # TrainingArguments(deepspeed=...): ZeRO inside each group of 2, IST across the 2 groups
                 (2, 2, "reset", "layers", "linear", 2, "callback"), (2, 2, "carry", "heads", "constant", 3, "trainer"),
                 # ist_accel.apply(trainer, config) on the built plain Trainer subclass: the same code, explicit
                 (2, 1, "reset", "layers", "linear", 0, "apply")]


@pytest.mark.parametrize("S,G,policy,decomposition,scheduler,zero,route", TRAINER_CASES,
                         ids=[f"S{s}xG{g}-{p}-{d}-{sch}" + (f"-zero{z}" if z else "") + f"-{r}"
                              for s, g, p, d, sch, z, r in TRAINER_CASES])
def test_trainer_matches_reference(tmp_path, S, G, policy, decomposition, scheduler, zero, route, request):
    if zero:
        request.getfixturevalue("deepspeed_cpu_comm_op")
    proc = torchrun("trainer_worker.py", S * G, ["--num-subnets", str(S), "--group-size", str(G), "--policy", policy,
                                                "--decomposition", decomposition, "--lr-scheduler", scheduler,
                                                "--zero-stage", str(zero), "--route", route, "--out", str(tmp_path)],
                    timeout=600, env={"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    assert (tmp_path / "result.json").exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["rounds"], result["steps"]) == (STEPS // LOCAL, STEPS)  # accumulation counts optimizer steps
    assert result["trainer_class"] == "ISTInOrder"  # the callback made InOrder the IST form of its own class
    got = load_folder(tmp_path / "final")
    expected, d = reference(S, G, policy, decomposition, linear=scheduler == "linear")
    for key, value in d.export_state(expected.state_dict()).items():  # save_model exports the evaluated model
        if key in got:  # save_pretrained drops the tied lm_head.weight
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
    # evaluate() scored the global model in its evaluation view
    items = token_set(4 * BATCH * S * G, 2)
    x = torch.stack([i["input_ids"] for i in items])
    with d.eval_view(expected) as view, torch.no_grad():
        losses = [view(x[i:i + BATCH], labels=x[i:i + BATCH], use_cache=False, num_items_in_batch=BATCH * x.shape[1]).loss
                  for i in range(0, len(x), BATCH)]
    assert result["eval_loss"] == pytest.approx(float(torch.stack(losses).mean()), rel=1e-5)
    logged = {k for entry in result["log_history"] for k in entry}
    assert {"ist/round", "ist/bytes_sent_total", "ist/bytes_lower_total", "ist/sync_seconds", "loss"} <= logged


@pytest.mark.parametrize("zero", [0, 2], ids=["ddp", "zero2"])
def test_save_steps_and_resume_from_checkpoint_continue_exactly(tmp_path, zero, request):
    """Checkpoints every round (save_steps = local_steps); a second run resumed from the
    step-4 checkpoint ends with the parameters of the first; W&B (offline) gets IST metrics.
    With DeepSpeed (ZeRO-2, G=1) the Trainer's engine checkpoint is replaced by IST's state.
    Without: the first run is a plain Trainer with ISTCallback, the resumed one ISTTrainer
    (one checkpoint format for both routes). Under DeepSpeed the wire is int8 (issue 34): its
    codes are a pure function of the seed, round and values, so a resume is exact with it too."""
    if zero:
        request.getfixturevalue("deepspeed_cpu_comm_op")
    common = ["--policy", "carry", "--decomposition", "heads", "--save-steps", "2", "--lr-scheduler", "linear",
              "--zero-stage", str(zero), "--wire-dtype", "int8" if zero else "fp32"]
    env = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    first = torchrun("trainer_worker.py", 2, [*common, "--report-to", "wandb", "--route",
                                              "trainer" if zero else "callback", "--out", str(tmp_path / "a")], env=env)
    assert (tmp_path / "a" / "result.json").exists(), first.stderr[-5000:]
    checkpoint = tmp_path / "a" / "checkpoint-4"
    assert {p.name for p in checkpoint.glob("ist_rank*.pt")} == {"ist_rank0.pt", "ist_rank1.pt"}
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    second = torchrun("trainer_worker.py", 2, [*common, "--resume", str(checkpoint), "--out", str(tmp_path / "b")],
                      env=env)
    assert (tmp_path / "b" / "result.json").exists(), second.stderr[-5000:]
    a, b = load_folder(tmp_path / "a" / "final"), load_folder(tmp_path / "b" / "final")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=lambda m: f"{key}: {m}")
    result = json.loads((tmp_path / "b" / "result.json").read_text())
    assert (result["rounds"], result["steps"]) == (3, 6)


def test_seq2seq_trainer_with_the_callback_trains_t5_layers_and_generates(tmp_path):
    proc = torchrun("seq2seq_worker.py", 2, ["--out", str(tmp_path)], env={"HF_HUB_OFFLINE": "1"})
    assert (tmp_path / "result.json").exists(), proc.stderr[-5000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["rounds"] == 5 and result["eval_loss"] < result["first_loss"]
    assert result["trainer_class"] == "ISTSeq2SeqTrainer"  # a plain Seq2SeqTrainer, made IST by ISTCallback
    assert result["predictions_shape"][0] == 16 and result["predictions_shape"][1] >= 2  # generated token ids
    assert result["predict_loss"] > 0


def test_save_steps_off_the_round_end_is_refused(tmp_path):
    proc = torchrun("trainer_worker.py", 2, ["--save-steps", "3", "--out", str(tmp_path)], env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0 and "save_steps=3 must be a multiple of ist_config.local_steps=2" in proc.stderr


def test_callback_added_after_the_trainer_was_built_refuses_to_train(tmp_path):
    """trainer.add_callback(ISTCallback(...)) comes too late (the accelerator is not IST's):
    train() stops with a message naming the fix, instead of training plain DDP."""
    from transformers import Trainer, TrainingArguments

    from ist_accel import ISTCallback

    trainer = Trainer(model=make_model("gpt2"), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                       max_steps=2, report_to="none"),
                      train_dataset=token_set(8, 1))
    trainer.add_callback(ISTCallback(ISTConfig(num_subnets=2, local_steps=2, decomposition="layers")))
    with pytest.raises(RuntimeError, match=r"added after the Trainer was built.*callbacks=\[ISTCallback"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_callback_added_after_the_trainer_was_built_names_the_explicit_call(tmp_path):
    """The refusal of a late ISTCallback points at ist_accel.apply(trainer, config)."""
    from transformers import Trainer, TrainingArguments

    from ist_accel import ISTCallback

    trainer = Trainer(model=make_model("gpt2"), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                       max_steps=2, report_to="none"),
                      train_dataset=token_set(8, 1))
    trainer.add_callback(ISTCallback(ISTConfig(num_subnets=2, local_steps=2, decomposition="layers")))
    with pytest.raises(RuntimeError, match=r"ist_accel\.apply\(trainer, ist_config\)"):
        trainer.train()
    assert trainer.state.global_step == 0 and type(trainer) is Trainer


def test_callback_refuses_a_frame_other_than_trainer_init(tmp_path):
    """ISTCallback takes its Trainer only from the Trainer.__init__ frame that fires on_init_end:
    fired from anywhere else (here a method of the built Trainer's subclass) it refuses and
    names the explicit call, and the Trainer stays as it was."""
    from transformers import Trainer, TrainingArguments

    from ist_accel import ISTCallback

    class Refires(Trainer):
        def refire(self):
            return self.callback_handler.on_init_end(self.args, self.state, self.control)

    callback = ISTCallback(ISTConfig(num_subnets=2, local_steps=2, decomposition="layers"))
    trainer = Refires(model=make_model("gpt2"), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                       max_steps=2, report_to="none"),
                      train_dataset=token_set(8, 1))
    trainer.add_callback(callback)
    with pytest.raises(RuntimeError, match=r"not fired by Trainer\.__init__.*ist_accel\.apply\(trainer, ist_config\)"):
        trainer.refire()
    with pytest.raises(RuntimeError, match=r"not fired by Trainer\.__init__"):
        callback.on_init_end(trainer.args, trainer.state, trainer.control)
    assert type(trainer) is Refires and callback.trainer is None


def test_apply_refuses_what_is_not_a_trainer():
    import ist_accel

    with pytest.raises(TypeError, match="takes a transformers.Trainer"):
        ist_accel.apply(object(), ISTConfig(num_subnets=2, local_steps=2))
