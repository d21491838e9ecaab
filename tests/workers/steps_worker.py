"""An Accelerate loop whose step axis is not IST's (it logs once per epoch at ``step=epoch``,
as Accelerate's own examples do), stopped after a checkpoint and resumed, with a tracker
that behaves as W&B does: a log at a step below the current one is dropped (recorded here
as a drop). Phase ``first`` trains epochs 0-1 and saves; ``resume`` loads and trains 2-3,
continuing the same tracker file (a resumed W&B run)."""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from accelerate.tracking import GeneralTracker

sys.path.insert(0, os.path.dirname(__file__))
from common import batch_for, loss_fn, make_model  # noqa: E402

from ist_accel import ISTAccelerator, ISTConfig  # noqa: E402

STEPS_PER_EPOCH, LOCAL_STEPS = 10, 5


class WandbLike(GeneralTracker):
    name = "wandb_like"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = Path(path)
        saved = json.loads(self.path.read_text()) if self.path.exists() else {"logs": [], "drops": [], "step": 0}
        self.logs, self.drops, self.step = saved["logs"], saved["drops"], saved["step"]

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values: dict) -> None:
        pass

    def log(self, values: dict, step=None, **kwargs) -> None:
        step = self.step if step is None else step
        if step < self.step:  # W&B: "Tried to log to step N that is less than the current step M"
            self.drops.append({"step": step, "current": self.step, "keys": sorted(values)})
            return
        self.step = step
        self.logs.append({"step": step, "values": {k: float(v) for k, v in values.items()}})

    def log_images(self, values: dict, step=None, **kwargs) -> None:
        self.log({k: 0.0 for k in values}, step=step)

    def finish(self) -> None:
        self.path.write_text(json.dumps({"logs": self.logs, "drops": self.drops, "step": self.step}))


class Epoch:
    def __init__(self) -> None:
        self.done = 0

    def state_dict(self) -> dict:
        return {"done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.done = state["done"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=("first", "resume"), required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    accelerator = ISTAccelerator(ISTConfig(num_subnets=2, local_steps=LOCAL_STEPS, seed=5), cpu=True,
                                 log_with=[WandbLike(os.path.join(args.out, "tracker.json"))])
    model = make_model("mlp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model, optimizer = accelerator.prepare(model, optimizer)
    epoch = Epoch()
    accelerator.register_for_checkpointing(epoch)
    if args.phase == "resume":
        accelerator.load_state(os.path.join(args.out, "ckpt"))
    accelerator.init_trackers("steps")
    s = accelerator.ist.group_index
    for e in range(epoch.done, epoch.done + 2):
        total = 0.0
        for t in range(STEPS_PER_EPOCH):
            loss = loss_fn(model, batch_for("mlp", s, 0, e * STEPS_PER_EPOCH + t))
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            total += loss.item()
        accelerator.log({"train/loss": total / STEPS_PER_EPOCH, "epoch": e}, step=e)
        epoch.done = e + 1
    if args.phase == "first":
        accelerator.save_state(os.path.join(args.out, "ckpt"))
    accelerator.end_training()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
