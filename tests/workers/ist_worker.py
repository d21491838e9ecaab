"""A worker for multi-process tests: trains IST rounds on deterministic batches and
saves the gathered global model and per-round metrics (rank 0)."""

import argparse
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist


sys.path.insert(0, os.path.dirname(__file__))
from common import WireCount, batch_for, eval_items, make_model, loss_fn, score  # noqa: E402

from ist_accel import ISTConfig  # noqa: E402
from ist_accel.round import IST  # noqa: E402
from ist_accel.wiretap import Wiretap  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--num-subnets", type=int, required=True)
    ap.add_argument("--group-size", type=int, default=1)
    ap.add_argument("--policy", default="reset")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--wire-dtype", default="fp32")
    ap.add_argument("--wire-block", type=int, default=64)
    ap.add_argument("--out", required=True)
    ap.add_argument("--nonfinite", default="raise")
    ap.add_argument("--decomposition", default="auto")
    ap.add_argument("--seed-rank-offset", type=int, default=0, help="rank r uses seed 5 + r * offset")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--outer-lr", type=float, default=1.0)
    ap.add_argument("--outer-momentum", type=float, default=0.0)
    ap.add_argument("--outer-nesterov", action="store_true")
    ap.add_argument("--min-blocks", type=int, default=0)
    ap.add_argument("--assignment", default="random")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                    help="the model's and batches' dtype (float64 with --wire-dtype fp64: exact checks)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    config = ISTConfig(num_subnets=args.num_subnets, group_size=args.group_size, local_steps=args.local_steps,
                       optimizer_state=args.policy, seed=5 + dist.get_rank() * args.seed_rank_offset,
                       wire_dtype=args.wire_dtype, wire_block=args.wire_block, nonfinite=args.nonfinite, decomposition=args.decomposition, sync_timeout=args.timeout,
                       outer_lr=args.outer_lr, outer_momentum=args.outer_momentum, outer_nesterov=args.outer_nesterov,
                       min_blocks=args.min_blocks, assignment=args.assignment)
    model = make_model(args.model, dtype)
    tap = Wiretap().install()  # the package's wiretap, which the recipes report: checked against the engine
    wire = WireCount().install()  # the test's own count (tests/workers/common.py), apart from both
    ist = IST(model, lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), config)
    sync = ist.sync
    syncs = []  # per sync, this rank's counted bytes: within the sync by kind, and since the previous one
    last = {"sent": wire.total_sent()}

    def counted_sync():
        before = dict(wire.sent)
        with tap.phase("exchange"):
            metrics = sync()
        syncs.append({"p2p": wire.sent["p2p"] - before["p2p"],
                      "collective": wire.sent["collective"] - before["collective"],
                      "since_previous": wire.total_sent() - last["sent"]})
        last["sent"] = wire.total_sent()
        return metrics

    ist.sync = counted_sync
    resident_after_setup = ist.resident_elements()
    s, g = ist.group_index, ist.replica
    for t in range(args.rounds * args.local_steps):
        loss = loss_fn(ist.model, batch_for(args.model, s, g, t, dtype))
        loss.backward()
        peak = ist.resident_elements()
        ist.optimizer.step()
        ist.optimizer.zero_grad(set_to_none=True)
    history = [vars(m) for m in ist.totals.history]
    ledger_before = ist.transport.ledger.copy()
    accuracy = ist.evaluate(eval_items(args.model, dtype), batch_size=7, score=score)
    gather_bytes = [after - before for after, before in zip(ist.transport.ledger.copy()["gather"],
                                                           ledger_before.get("gather", (0.0, 0.0)))]
    resident_after_eval = ist.resident_elements()
    model = ist.gather_global(dst=0)
    if ist.rank == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(args.out, "global.pt"))
    with open(os.path.join(args.out, f"rank{ist.rank}.json"), "w") as f:
        json.dump({"wiretap": tap.report(), "ledger": ist.transport.ledger.copy(), "syncs": syncs,
                   "wire": {"sent": wire.sent, "received": wire.received, "calls": wire.calls}, "history": history, "accuracy": accuracy, "resident_after_eval": resident_after_eval, "resident_after_setup": resident_after_setup, "resident_peak": peak,
                   "subnet_elements": sum(t.numel() for t in ist.subnet.state_dict().values()),
                   "subnet_float_elements": sum(t.numel() for t in ist.subnet.state_dict().values()
                                                if t.is_floating_point()),
                   "owner_elements": ist.exchange.owners.numel(), "eval_gather_bytes": gather_bytes,
                   "global_elements": sum(sh.numel() for sh, _ in ist.global_shapes.values())}, f)
    ist.remove_hooks()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
