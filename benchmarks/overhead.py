"""The per-step cost of IST's hooks and wrappers: an ``ISTAccelerator`` loop against a bare
PyTorch loop training a module of the same subnet shape, in the same process, blocks of
steps interleaved so both see the same machine.

Spawns ``--workers`` processes (S = workers, gloo). Each trains the IST MLP (784-H-H-10 with
BatchNorm) through ``ISTAccelerator`` with ``accelerator.backward`` / ``optimizer.step`` and,
between rounds, the same number of steps of a bare loop (``loss.backward``; ``SGD.step``)
on a fresh copy of its subnet's shape with the same batches. Reported: the median wall time
of a step that does not end a round, IST against bare (the overhead of the hooks and
wrappers), and what the round-ending step adds (the sync, waiting for peers included, and
the next round's plan), amortized over the round.

    python benchmarks/overhead.py --workers 4 --hidden 1024 --local-steps 20 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4, help="processes = subnets")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--local-steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def _worker(rank: int, args: argparse.Namespace, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(args.workers),
                      LOCAL_RANK=str(rank), ACCELERATE_USE_CPU="true")
    torch.set_num_threads(1)
    from torch import nn

    from ist_accel import ISTAccelerator, ISTConfig
    from ist_accel.models import MLP

    accelerator = ISTAccelerator(ISTConfig(num_subnets=args.workers, local_steps=args.local_steps), cpu=True)
    torch.manual_seed(0)
    model = MLP(784, [args.hidden, args.hidden], 10, norm="batch")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    ist = accelerator.ist
    bare = ist.decomposition.build_subnet(ist.group_index)  # the same shape, trained plainly
    bare_optimizer = torch.optim.SGD(bare.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(args.batch_size, 784, generator=g), torch.randint(0, 10, (args.batch_size,), generator=g))
               for _ in range(args.local_steps)]
    ist_steps, bare_steps, round_end = [], [], []
    def ist_round() -> list[float]:
        times = []
        for x, y in batches:
            start = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        return times

    def bare_round() -> list[float]:
        times = []
        for x, y in batches:
            start = time.perf_counter()
            loss = nn.functional.cross_entropy(bare(x), y)
            loss.backward()
            bare_optimizer.step()
            bare_optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        return times

    for r in range(args.rounds + 1):
        if r % 2:  # alternate which goes first
            times, plain = ist_round(), bare_round()
        else:
            plain, times = bare_round(), ist_round()
        if r:  # the first round warms up
            ist_steps += times[:-1]
            round_end.append(times[-1] - statistics.median(times[:-1]))
            bare_steps += plain
    last = ist.totals.history[-1]
    queue.put({"rank": rank, "ist_step": statistics.median(ist_steps), "bare_step": statistics.median(bare_steps),
               "round_end_extra": statistics.median(round_end), "sync_seconds": last.sync_seconds,
               "plan_seconds": last.plan_seconds, "subnet_params": ist.subnet_numel()})
    accelerator.wait_for_everyone()
    os._exit(0)


def run(args: argparse.Namespace) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker, args=(r, args, port, queue)) for r in range(args.workers)]
    for p in procs:
        p.start()
    results = sorted((queue.get() for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join(timeout=60)
    mean = statistics.fmean
    out = {"workers": args.workers, "hidden": args.hidden, "batch_size": args.batch_size,
           "local_steps": args.local_steps, "rounds": args.rounds,
           "ist_step_seconds": mean(r["ist_step"] for r in results),
           "bare_step_seconds": mean(r["bare_step"] for r in results),
           "round_end_extra_seconds": mean(r["round_end_extra"] for r in results), "per_worker": results}
    out["step_overhead"] = out["ist_step_seconds"] / out["bare_step_seconds"] - 1
    out["with_round_end"] = (out["ist_step_seconds"] + out["round_end_extra_seconds"] / args.local_steps) \
        / out["bare_step_seconds"] - 1
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    r = run(args)
    print(f"MLP 784-{args.hidden}-{args.hidden}-10, S = {args.workers}, batch {args.batch_size}, "
          f"{args.local_steps} local steps: step {r['ist_step_seconds'] * 1e3:.2f} ms (IST) vs "
          f"{r['bare_step_seconds'] * 1e3:.2f} ms (bare): overhead {r['step_overhead']:+.1%}; the round end adds "
          f"{r['round_end_extra_seconds'] * 1e3:.1f} ms ({r['with_round_end']:+.1%} per step with it)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
