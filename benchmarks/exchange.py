"""IST's round-end sync against a whole-model all-reduce (what LocalSGD does each round),
side by side in one run.

Spawns ``--workers`` processes (gloo on CPU; ``--gpu``: NCCL, one GPU per worker), builds
the IST engine on each and times ``--rounds`` real round transitions (``IST.sync``)
interleaved with an all-reduce of every parameter of the model, a barrier before each, so
both see the same machine. A sync is broken down into its phases (``check``: agreement and
non-finite flags; ``pack``; ``wire``: the messages and the shared all-reduce, waiting
included; ``unpack``) and the next round's plan, which is built after the sync, outside
it. Bytes are the engine's byte ledger (point-to-point messages exactly, the shared
all-reduce as its ring share) next to the round's lower bound. Prints a markdown table;
``--json`` writes the numbers; ``--profile FILE`` writes a cProfile of rank 0's syncs.

    python benchmarks/exchange.py --model preact_resnet101 --num-subnets 4 --workers 4 --json out.json
    python benchmarks/exchange.py --grid --json docs/bench/exchange.json   # the table in docs/exchange.md
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PHASES = ("check", "pack", "wire", "unpack")
GRID = [  # (model, S, workers, wire dtype): the grid
    ("mlp", 2, 2, "fp32"), ("mlp", 4, 4, "fp32"), ("mlp", 2, 4, "fp32"), ("mlp", 4, 4, "bf16"),
    ("preact_resnet101", 2, 2, "fp32"), ("preact_resnet101", 4, 4, "fp32"), ("preact_resnet101", 2, 4, "fp32"),
    ("preact_resnet101", 4, 4, "bf16"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="preact_resnet101", help="ist_accel.models name, e.g. preact_resnet101, resnet50, mlp")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--num-subnets", type=int, default=4)
    ap.add_argument("--workers", type=int, default=None, help="processes (default: num_subnets); must be S x G")
    ap.add_argument("--rounds", type=int, default=5, help="round transitions to time (after one untimed)")
    ap.add_argument("--min-blocks", type=int, default=0)
    ap.add_argument("--hidden", default="1024,1024", help="mlp only")
    ap.add_argument("--wire-dtype", default="fp32", choices=["fp32", "bf16", "fp16", "int8", "int4", "fp8"])
    ap.add_argument("--gpu", action="store_true", help="NCCL, one GPU per worker")
    ap.add_argument("--grid", action="store_true", help="run the grid of docs/exchange.md (MLP and ResNet-101, "
                                                        "S = 2 and 4, G = 2, fp32 and bf16)")
    ap.add_argument("--profile", default=None, help="write a cProfile of rank 0's timed syncs here")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)
    args.workers = args.workers or args.num_subnets
    if args.workers % args.num_subnets:
        ap.error(f"--workers {args.workers} is not a multiple of --num-subnets {args.num_subnets}")
    if args.gpu and not torch.cuda.is_available():
        ap.error("--gpu needs CUDA devices")
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
    device = torch.device("cuda", rank) if args.gpu else torch.device("cpu")
    if args.gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if args.gpu else "gloo", rank=rank, world_size=args.workers)
    model = _model(args).to(device)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    config = ISTConfig(num_subnets=args.num_subnets, group_size=args.workers // args.num_subnets,
                       min_blocks=args.min_blocks, local_steps=1, wire_dtype=args.wire_dtype)
    ist = IST(model, lambda p: torch.optim.SGD(p, lr=0.0), config)
    sync = lambda: (torch.cuda.synchronize() if args.gpu else None)  # noqa: E731
    dist.barrier()
    ist.sync()  # untimed: first-use costs
    profile = cProfile.Profile() if args.profile and rank == 0 else None
    rounds, allreduce = [], []
    for _ in range(args.rounds):
        dist.barrier()
        if profile:
            profile.enable()
        rounds.append(ist.sync())
        if profile:
            profile.disable()
        sync()
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(flat)
        sync()
        allreduce.append(time.perf_counter() - start)
    memory = ist.resident_bytes()
    n = args.workers
    text = None
    if profile:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(30)
        text = out.getvalue()
    queue.put({
        "rank": rank,
        "ist_bytes_sent": [m.bytes_sent for m in rounds],
        "ist_bytes_received": [m.bytes_received for m in rounds],
        "lower_bound_bytes": [m.bytes_lower for m in rounds],
        "ist_sync_seconds": [m.sync_seconds for m in rounds],
        **{f"{p}_seconds": [getattr(m, f"{p}_seconds") for m in rounds] for p in (*PHASES, "plan")},
        "allreduce_bytes_sent": 2 * (n - 1) / n * flat.numel() * flat.element_size(),
        "allreduce_seconds": allreduce,
        "subnet_params": sum(p.numel() for p in ist.model.parameters()),
        "model_params": flat.numel(),
        "plan_bytes": memory["plans"],
        "buffer_bytes": memory["buffers"],
        "owner_shard_bytes": memory["owner_shards"],
        "profile": text,
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
    mean, median = statistics.fmean, statistics.median
    per_round = lambda key: mean(mean(r[key]) for r in results)  # noqa: E731
    slowest = lambda key: median(max(r[key][i] for r in results) for i in range(args.rounds))  # noqa: E731
    out = {
        "model": args.model, "num_subnets": args.num_subnets, "workers": args.workers,
        "group_size": args.workers // args.num_subnets, "rounds": args.rounds, "wire_dtype": args.wire_dtype,
        "backend": "nccl" if args.gpu else "gloo",
        "model_params": results[0]["model_params"],
        "subnet_params_mean": mean(r["subnet_params"] for r in results),
        "ist_bytes_sent_per_worker": per_round("ist_bytes_sent"),
        "ist_bytes_received_per_worker": per_round("ist_bytes_received"),
        "lower_bound_bytes_per_worker": per_round("lower_bound_bytes"),
        "allreduce_bytes_sent_per_worker": mean(r["allreduce_bytes_sent"] for r in results),
        # a round ends when the slowest rank is done: per round the max over ranks, median over rounds
        "ist_sync_seconds": slowest("ist_sync_seconds"),
        **{f"{p}_seconds": slowest(f"{p}_seconds") for p in (*PHASES, "plan")},
        "allreduce_seconds": slowest("allreduce_seconds"),
        "plan_bytes": max(r["plan_bytes"] for r in results),
        "buffer_bytes": max(r["buffer_bytes"] for r in results),
        "owner_shard_bytes": max(r["owner_shard_bytes"] for r in results),
        "per_worker": [{k: v for k, v in r.items() if k != "profile"} for r in results],
    }
    out["ist_over_allreduce"] = out["ist_bytes_sent_per_worker"] / out["allreduce_bytes_sent_per_worker"]
    out["ist_over_lower_bound"] = out["ist_bytes_sent_per_worker"] / out["lower_bound_bytes_per_worker"]
    out["time_over_allreduce"] = out["ist_sync_seconds"] / out["allreduce_seconds"]
    if args.profile:
        with open(args.profile, "w") as f:
            f.write(results[0]["profile"] or "")
    return out


def markdown(rows: list[dict]) -> str:
    mib = 2**20
    head = ("| model | S x G | wire | IST MiB sent | x all-reduce bytes | x bound | sync s (check / pack / wire / unpack) "
            "| all-reduce s | sync / all-reduce | plan s (after the sync) | plan KiB |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        phases = " / ".join(f"{r[f'{p}_seconds']:.3f}" for p in PHASES)
        lines.append(
            f"| {r['model']} | {r['num_subnets']} x {r['group_size']} | {r['wire_dtype']} | "
            f"{r['ist_bytes_sent_per_worker'] / mib:,.2f} | {r['ist_over_allreduce']:.3f} | {r['ist_over_lower_bound']:.3f} "
            f"| {r['ist_sync_seconds']:.3f} ({phases}) | {r['allreduce_seconds']:.3f} | **{r['time_over_allreduce']:.2f}** "
            f"| {r['plan_seconds']:.3f} | {r['plan_bytes'] / 1024:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.grid:
        rows = []
        for model, S, workers, wire in GRID:
            rows.append(run(argparse.Namespace(**{**vars(args), "model": model, "num_subnets": S, "workers": workers,
                                                   "wire_dtype": wire, "profile": None})))
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    else:
        rows = [run(args)]
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows if args.grid else rows[0], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
