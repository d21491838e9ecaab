"""A worker for ISTTrainer tests: the HF Trainer (use_cpu, torchrun) trains a tiny GPT-2
with IST on a fixed token set read in order, evaluates the global model and saves it."""

import argparse
import json
import os
import sys

import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(__file__))
from common import make_model  # noqa: E402

from ist_accel import ISTConfig  # noqa: E402
from ist_accel import ISTCallback, ISTTrainer, apply  # noqa: E402

BATCH, VOCAB, LENGTH = 4, 31, 10


def token_set(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    return [{"input_ids": r, "labels": r} for r in rows]


class InOrder(Trainer):
    """A user's own Trainer subclass: reads the training set in order, so the test knows
    every rank's batches. ``--route callback`` adds IST to it with ISTCallback."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class ISTInOrder(ISTTrainer):
    """The same with ISTTrainer (``--route trainer``)."""

    _get_train_sampler = InOrder._get_train_sampler


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-subnets", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=1)
    ap.add_argument("--policy", default="reset")
    ap.add_argument("--decomposition", default="layers")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--save-steps", type=int, default=0)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--report-to", default="none")
    ap.add_argument("--lr-scheduler", default="constant")
    ap.add_argument("--zero-stage", type=int, default=0, help="DeepSpeed ZeRO stage inside each group (0: none)")
    ap.add_argument("--route", choices=["trainer", "callback", "apply"], default="trainer",
                    help="ISTTrainer(ist_config=...), a plain Trainer subclass with callbacks=[ISTCallback(...)], "
                         "or the built plain Trainer subclass handed to ist_accel.apply(trainer, config)")
    ap.add_argument("--wire-dtype", default="fp32")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    training_args = TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
        gradient_accumulation_steps=args.accum, max_steps=args.steps, learning_rate=0.01, lr_scheduler_type=args.lr_scheduler,
        weight_decay=0.0, max_grad_norm=0.0, optim="sgd", use_cpu=True, report_to=args.report_to,
        logging_steps=args.local_steps, save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500, dataloader_drop_last=True, seed=0, disable_tqdm=True,
        run_name="ist-trainer-test",
        deepspeed={"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                   "train_batch_size": "auto", "gradient_clipping": "auto",
                   "zero_optimization": {"stage": args.zero_stage, "stage3_param_persistence_threshold": 0}}
        if args.zero_stage else None)
    policy, _, outer = args.policy.partition("-")  # "reset-diloco": DiLoCo's outer step (issue 17)
    config = ISTConfig(num_subnets=args.num_subnets, group_size=args.group_size, local_steps=args.local_steps,
                       optimizer_state=policy, decomposition=args.decomposition, seed=5, wire_dtype=args.wire_dtype,
                       **({"outer_lr": 0.7, "outer_momentum": 0.9, "outer_nesterov": True} if outer == "diloco" else {}))
    data = {"train_dataset": token_set(args.steps * args.accum * BATCH * world, 1),
            "eval_dataset": token_set(4 * BATCH * world, 2)}
    if args.route == "callback":
        trainer = InOrder(model=make_model("gpt2"), args=training_args, callbacks=[ISTCallback(config)], **data)
    elif args.route == "apply":
        trainer = apply(InOrder(model=make_model("gpt2"), args=training_args, **data), config)
    else:
        trainer = ISTInOrder(model=make_model("gpt2"), args=training_args, ist_config=config, **data)
    trainer.train(resume_from_checkpoint=args.resume)
    metrics = trainer.evaluate()
    trainer.save_model(os.path.join(args.out, "final"))
    if trainer.args.process_index == 0:
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump({"eval_loss": metrics["eval_loss"], "log_history": trainer.state.log_history,
                       "rounds": trainer.ist.round, "steps": trainer.ist.steps,
                       "trainer_class": type(trainer).__name__}, f)
    trainer.accelerator.wait_for_everyone()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
