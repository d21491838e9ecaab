"""Several drills of the round engine in one launch (2 gloo ranks, plain IST): ranks out of
step or with another model are told so (every rank raises the same ISTAgreementError, so
the next drill can start in the same process group), a round ended early by ``finish()``
is synced, a read mid-round is the model a sync would produce, frozen parameters stay
frozen. Each rank writes what it saw to ``rank<r>.json``; rank 0 saves the models."""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from common import batch_for, eval_items, loss_fn, score  # noqa: E402

from ist_accel import IST, ISTAgreementError, ISTConfig  # noqa: E402
from ist_accel.models import MLP  # noqa: E402


def mlp(hidden: int = 16, frozen: bool = False) -> torch.nn.Module:
    torch.manual_seed(1234)
    model = MLP(12, [hidden, hidden], 3, norm="batch")
    if frozen:
        model[1].weight.requires_grad_(False)  # the first Linear, cut by rows
    return model


def engine(model: torch.nn.Module, local_steps: int) -> IST:
    config = ISTConfig(num_subnets=2, local_steps=local_steps, seed=5)
    return IST(model, lambda p: torch.optim.SGD([q for q in p if q.requires_grad], lr=0.01, momentum=0.9), config)


def train(ist: IST, steps: int, first: int = 0) -> None:
    for t in range(first, first + steps):
        loss_fn(ist.model, batch_for("mlp", ist.group_index, 0, t)).backward()
        ist.optimizer.step()
        ist.optimizer.zero_grad(set_to_none=True)


def refused(fn) -> str | None:
    try:
        fn()
    except ISTAgreementError as error:
        return str(error)
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    seen: dict[str, object] = {}

    # ranks one step apart, then the global model is read: refused on every rank
    ist = engine(mlp(), local_steps=10)
    train(ist, 5 + rank)
    seen["steps_apart_read"] = refused(lambda: ist.evaluate(eval_items("mlp"), score=score))
    ist.remove_hooks()

    # one rank ends its loop at step 7 (finish: a partial sync), the other syncs at step 10
    ist = engine(mlp(), local_steps=10)
    seen["seven_vs_ten"] = refused(lambda: (train(ist, 7), ist.finish()) if rank == 0 else train(ist, 10))
    ist.remove_hooks()

    # another hidden width on one rank: refused at set-up, before anything moves
    seen["other_width"] = refused(lambda: engine(mlp(hidden=16 if rank == 0 else 32), local_steps=4))

    # 6 steps with rounds of 4: a read mid-round, then finish() syncs the last 2 steps
    ist = engine(mlp(), local_steps=4)
    train(ist, 6)
    seen["mid_round_accuracy"] = ist.evaluate(eval_items("mlp"), score=score)
    model = ist.gather_global(dst=0)
    if rank == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(args.out, "mid_round.pt"))
    seen["finish"] = ist.finish() is not None
    seen["after_finish"] = (ist.round, ist.steps, ist.round_steps)
    seen["finished_accuracy"] = ist.evaluate(eval_items("mlp"), score=score)
    model = ist.gather_global(dst=0)
    if rank == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(args.out, "partial.pt"))
    ist.remove_hooks()

    # a frozen first Linear: never trained, and the rest as the reference
    ist = engine(mlp(frozen=True), local_steps=2)
    seen["frozen_requires_grad"] = [n for n, p in ist.model.named_parameters() if not p.requires_grad]
    train(ist, 6)
    model = ist.gather_global(dst=0)
    if rank == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(args.out, "frozen.pt"))
    ist.remove_hooks()

    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
