"""IST exchange vs a whole-model all-reduce (what LocalSGD does each round).

Spawns ``--workers`` processes (gloo on CPU, NCCL not wired yet), builds the IST engine on
each, and times ``--rounds`` real round transitions (``IST.sync``) next to all-reducing
every parameter of the model. Bytes are counted by the engine per message (point-to-point
sends exactly; all-reduces as the bandwidth-optimal ``2 (N-1)/N`` of their payload, for
both sides alike). Prints a markdown table; ``--json`` writes the numbers.

    python benchmarks/exchange.py --model preact_resnet101 --num-subnets 4 --workers 4 --json out.json
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
import torch.distributed as dist
import torch.multiprocessing as mp


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="preact_resnet101", help="ist_accel.models name, e.g. preact_resnet101, resnet50, mlp")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--num-subnets", type=int, default=4)
    ap.add_argument("--workers", type=int, default=None, help="processes (default: num_subnets); must be S x G")
    ap.add_argument("--rounds", type=int, default=3, help="round transitions to time")
    ap.add_argument("--min-blocks", type=int, default=0)
    ap.add_argument("--hidden", default="1024,1024", help="mlp only")
    ap.add_argument("--wire-dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)
    args.workers = args.workers or args.num_subnets
    if args.workers % args.num_subnets:
        ap.error(f"--workers {args.workers} is not a multiple of --num-subnets {args.num_subnets}")
    return args


def _model(args: argparse.Namespace) -> torch.nn.Module:
    from ist_accel.models import build_model

    torch.manual_seed(0)
    if args.model == "mlp":
        return build_model("mlp", args.num_classes, in_features=784, hidden=[int(h) for h in args.hidden.split(",")])
    return build_model(args.model, args.num_classes)


def _worker(rank: int, args: argparse.Namespace, port: int, queue) -> None:
    from ist_accel import IST, ISTConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.workers)
    model = _model(args)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    config = ISTConfig(num_subnets=args.num_subnets, group_size=args.workers // args.num_subnets,
                       min_blocks=args.min_blocks, local_steps=1, wire_dtype=args.wire_dtype)
    ist = IST(model, lambda p: torch.optim.SGD(p, lr=0.0), config)
    rounds = [ist.sync() for _ in range(args.rounds)]
    allreduce_seconds = []
    for _ in range(args.rounds):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(flat)
        allreduce_seconds.append(time.perf_counter() - start)
    n = args.workers
    queue.put({
        "rank": rank,
        "ist_bytes_sent": [m.bytes_sent for m in rounds],
        "ist_bytes_received": [m.bytes_received for m in rounds],
        "lower_bound_bytes": [m.bytes_lower for m in rounds],
        "ist_sync_seconds": [m.sync_seconds for m in rounds],
        "allreduce_bytes_sent": 2 * (n - 1) / n * flat.numel() * flat.element_size(),
        "allreduce_seconds": allreduce_seconds,
        "subnet_params": sum(p.numel() for p in ist.model.parameters()),
        "model_params": flat.numel(),
    })
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo can abort at interpreter exit; results are already sent


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
    per_round = lambda key: mean(mean(r[key]) for r in results)  # noqa: E731
    out = {
        "model": args.model, "num_subnets": args.num_subnets, "workers": args.workers,
        "rounds": args.rounds, "wire_dtype": args.wire_dtype, "backend": "gloo",
        "model_params": results[0]["model_params"],
        "subnet_params_mean": mean(r["subnet_params"] for r in results),
        "ist_bytes_sent_per_worker": per_round("ist_bytes_sent"),
        "ist_bytes_received_per_worker": per_round("ist_bytes_received"),
        "lower_bound_bytes_per_worker": per_round("lower_bound_bytes"),
        "allreduce_bytes_sent_per_worker": mean(r["allreduce_bytes_sent"] for r in results),
        "ist_sync_seconds": per_round("ist_sync_seconds"),
        "allreduce_seconds": per_round("allreduce_seconds"),
        "per_worker": results,
    }
    out["ist_over_allreduce"] = out["ist_bytes_sent_per_worker"] / out["allreduce_bytes_sent_per_worker"]
    out["ist_over_lower_bound"] = out["ist_bytes_sent_per_worker"] / out["lower_bound_bytes_per_worker"]
    return out


def markdown(r: dict) -> str:
    mib = 2**20
    return "\n".join([
        f"{r['model']}: S={r['num_subnets']}, {r['workers']} workers, {r['backend']}, wire {r['wire_dtype']}, "
        f"mean of {r['rounds']} rounds",
        "",
        "| per worker per round | bytes sent | x all-reduce | x lower bound | seconds |",
        "|---|---|---|---|---|",
        f"| IST exchange | {r['ist_bytes_sent_per_worker'] / mib:,.1f} MiB | {r['ist_over_allreduce']:.3f} | "
        f"{r['ist_over_lower_bound']:.3f} | {r['ist_sync_seconds']:.3f} |",
        f"| IST lower bound | {r['lower_bound_bytes_per_worker'] / mib:,.1f} MiB | "
        f"{r['lower_bound_bytes_per_worker'] / r['allreduce_bytes_sent_per_worker']:.3f} | 1.000 | |",
        f"| all-reduce of the model (LocalSGD) | {r['allreduce_bytes_sent_per_worker'] / mib:,.1f} MiB | 1.000 | "
        f"{r['allreduce_bytes_sent_per_worker'] / r['lower_bound_bytes_per_worker']:.3f} | {r['allreduce_seconds']:.3f} |",
    ])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
