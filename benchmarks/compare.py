#!/usr/bin/env python
"""IST against DDP and Accelerate's LocalSGD, side by side, in one invocation.

The three methods run the same recipe (same data, model, seeds, per-worker batch and step
budget), one multi-process launch each (gloo on CPU with launch_configs/cpu.yaml, NCCL on
GPUs); this script collects their results.json files and writes, per task,
``results.json``, ``table.md`` and two plots: accuracy against bytes sent per worker and
against modeled time at a link bandwidth (measured compute seconds + bytes / bandwidth).
The runs themselves (with their model weights) stay under ``runs/``, which git ignores; a
run whose exact command was run before (``runs/*/command.json``) is reused, not rerun.

    python benchmarks/compare.py --task mnist --num-subnets 2 --epochs 3 --seeds 0 1 --out docs/bench
    python benchmarks/compare.py --task cifar10 --num-subnets 4 --epochs 5 --out docs/bench
    # on N shaped network nodes, each method for a wall-clock budget (benchmarks/network.py; root):
    python benchmarks/compare.py --task mnist --num-subnets 4 --epochs 100 --local-steps 20 --eval-every 40 \
        --network 4xnone 4x100mbit 4x20mbit --train-seconds 120 --target 0.95 --out docs/bench
    # skewed data: the same seeded partition of the training set over the S workers for every method,
    # written to OUT/<task>_S<n>_<split> (iid: OUT/<task>_S<n>, the recipes' behaviour before --split):
    python benchmarks/compare.py --task mnist --num-subnets 4 --epochs 5 --seeds 0 1 --split dirichlet:0.1 --out docs/bench
    # an IST variant as one more row of the same table:
    python benchmarks/compare.py --task cifar10 --num-subnets 4 --epochs 5 --out docs/bench --methods ist \
        --ist-name ist_outer --ist-args=--outer-lr=0.7 --ist-args=--outer-momentum=0.9 --merge
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from ist_accel.accounting import ring_allreduce_bytes
from ist_accel.data.partition import parse_split

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "datasets"
TASKS = {  # recipe, its data, and defaults sized for a 2-core CPU machine (GPU: pass --arch etc.)
    "cifar10": ("recipes/resist_cifar.py", ["--data", str(DATA / "cifar10-jpeg.tar.gz"), "--arch", "preact_resnet20"]),
    "mnist": ("recipes/ist_mlp.py", ["--data", str(DATA / "mnist")]),
}
METHODS = ("ddp", "localsgd", "ist", "diloco")  # diloco: torchft's (pip install torchft)
COLORS = {"ddp": "C0", "localsgd": "C1", "ist": "C2", "diloco": "C3"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe_command(task: str, method: str, seed: int, args: argparse.Namespace, out: Path) -> list[str]:
    """The recipe and its arguments for one run (what follows the launcher's own flags)."""
    recipe, data_args = TASKS[task]
    return [str(ROOT / recipe), *data_args, "--method", method,
            "--seed", str(seed), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--local-steps", str(args.local_steps), "--eval-every", str(args.eval_every), "--output-dir", str(out),
            *(["--lr", str(args.lr)] if args.lr else []),
            *(["--split", str(args.split), "--split-seed", str(args.split_seed)] if args.split.kind != "iid" else []),
            *args.extra, *(args.ist_args if method == "ist" else [])]


def command(task: str, method: str, seed: int, args: argparse.Namespace, out: Path) -> list[str]:
    """The ``accelerate launch`` command of one run."""
    launcher = ["--multi_gpu"] if args.gpu else ["--config_file", str(ROOT / "launch_configs" / "cpu.yaml")]
    return [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", str(args.num_subnets),
            "--main_process_port", str(free_port()), *recipe_command(task, method, seed, args, out)]


def launch(task: str, method: str, seed: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = command(task, method, seed, args, out)
    results, recorded = out / "results.json", out / "command.json"
    what = [a for i, a in enumerate(cmd) if cmd[i - 1] != "--main_process_port" and a != "--main_process_port"]
    if results.exists() and recorded.exists() and json.loads(recorded.read_text()) == what:
        print(f"== {task} S={args.num_subnets} {method} seed {seed}: reusing {results}", flush=True)
        return json.loads(results.read_text())
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    print(f"== {task} S={args.num_subnets} {method} seed {seed}", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if not results.exists():
        raise SystemExit(f"{method} (seed {seed}) failed:\n{proc.stderr[-4000:]}")
    recorded.write_text(json.dumps(what))  # a later invocation with the same command reuses this run
    return json.loads(results.read_text())


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {(max(values) - min(values)) / 2:.2g}"


def ddp_bytes_per_sample(runs: dict[str, list[dict]], batch_size: int) -> tuple[float, str]:
    """DDP's bytes per worker and sample: measured where DDP was run, else its ring
    all-reduce of the model's gradients once per step, ``2 (N-1)/N x 4 x params / batch``."""
    if "ddp" in runs:
        return statistics.mean(r["bytes_sent_per_worker"] / r["samples_per_worker"] for r in runs["ddp"]), "measured"
    run = next(r for rs in runs.values() for r in rs)
    return ring_allreduce_bytes(run["model_params"], run["world_size"]) / batch_size, "ring model"


def wire_of(run: dict) -> tuple[str, bool]:
    """(wire dtype, overlap) of a run: IST's from its config; a baseline's fp32 without overlap."""
    config = run.get("ist_config") or {}
    return run.get("wire_dtype", config.get("wire_dtype", "fp32")), bool(run.get("overlap", config.get("overlap", False)))


def summarize(runs: dict[str, list[dict]], bandwidth: float, batch_size: int) -> tuple[list[dict], float]:
    """Per method: the table's numbers (means over seeds) and the common accuracy target."""
    target = min(max(p["accuracy"] for p in r["history"]) for rs in runs.values() for r in rs)
    rows = []
    ddp_bytes, ddp_source = ddp_bytes_per_sample(runs, batch_size)
    for method, rs in runs.items():
        per_sample = [r["bytes_sent_per_worker"] / r["samples_per_worker"] for r in rs]
        to_target = []
        for r in rs:
            reached = next((p for p in r["history"] if p["accuracy"] >= target), None)
            to_target.append(reached["compute_seconds"] + reached["bytes_sent_per_worker"] / bandwidth
                             if reached else float("nan"))
        rounds = [max(r["rounds"], 1) for r in rs]
        rows.append({
            "method": method,
            "final_accuracy": [r["final_accuracy"] for r in rs],
            "bytes_per_sample": per_sample,
            "total_bytes_per_sample": [r.get("total_bytes_sent_per_worker", r["bytes_sent_per_worker"])
                                       / r["samples_per_worker"] for r in rs],
            "wire_dtype": wire_of(rs[0])[0],
            "overlap": wire_of(rs[0])[1],
            "bytes_vs_ddp": [ddp_bytes / b if b else float("inf") for b in per_sample],
            "all_bytes_vs_ddp": [ddp_bytes * r["samples_per_worker"] / r.get("total_bytes_sent_per_worker",
                                                                              r["bytes_sent_per_worker"])
                                 if r.get("total_bytes_sent_per_worker", r["bytes_sent_per_worker"]) else float("inf")
                                 for r in rs],
            "ddp_bytes_from": ddp_source,
            "measured_vs_lower": [r["bytes_sent_per_worker"] / r["bytes_lower_per_worker"]
                                  if r["bytes_lower_per_worker"] else 1.0 for r in rs],
            "bytes_measured": rs[0]["bytes_measured"],
            "peak_rss_mib": [r["peak_rss_mib"] for r in rs],
            "peak_state_elements": [r["peak_state_elements"] for r in rs],
            "compute_s_per_round": [r["history"][-1]["compute_seconds"] / n for r, n in zip(rs, rounds)],
            "sync_s_per_round": [r["sync_seconds"] / n if r["sync_seconds"] is not None else float("nan")
                                 for r, n in zip(rs, rounds)],
            "modeled_seconds_to_target": to_target,
        })
    return rows, target


def slim(run: dict) -> dict:
    """A run as results.json keeps it: its IST config reduced to the wire it used."""
    dtype, overlap = wire_of(run)
    return {**{k: v for k, v in run.items() if k != "ist_config"}, "wire_dtype": dtype, "overlap": overlap}


def refresh(folder: Path) -> dict[str, Any]:
    """Summarize ``folder``'s results.json again from the runs it holds (new row fields, the
    same runs): ``compare.py --refresh docs/bench/*/``."""
    summary = json.loads((folder / "results.json").read_text())
    runs = {m: [slim(r) for r in rs] for m, rs in summary["runs"].items()}
    bandwidth = summary["bandwidth_gbps"] * 1e9 / 8
    rows, target = summarize(runs, bandwidth, summary["batch_size"])
    summary.update(rows=rows, accuracy_target=target, runs=runs)
    (folder / "results.json").write_text(json.dumps(summary, indent=1))
    (folder / "table.md").write_text(table(rows, target, bandwidth) + "\n")
    return summary


def table(rows: list[dict], target: float, bandwidth: float) -> str:
    head = ("| method | final accuracy | exchange bytes / worker / sample | all bytes / worker / sample | "
            "DDP bytes / these | bytes / lower bound | "
            f"peak RSS MiB | state elements / worker | compute s / round | sync s / round | "
            f"modeled s to {target:.3f} at {bandwidth * 8 / 1e9:g} Gbit/s |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        bytes_note = "" if r["bytes_measured"] else " (ring model)"
        lines.append(f"| {r['method']} | {spread(r['final_accuracy'])} | {spread(r['bytes_per_sample'])}{bytes_note} | "
                     f"{spread(r['total_bytes_per_sample'])} | "
                     f"{spread(r['bytes_vs_ddp'])}{'' if r.get('ddp_bytes_from') != 'ring model' else ' (vs ring model)'} | "
                     f"{spread(r['measured_vs_lower'])} | {spread(r['peak_rss_mib'])} | "
                     f"{spread(r['peak_state_elements'])} | {spread(r['compute_s_per_round'])} | "
                     f"{spread(r['sync_s_per_round'])} | {spread(r['modeled_seconds_to_target'])} |")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], bandwidth: float, out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, x_of, label in (
        ("accuracy_vs_bytes.png", lambda p: p["bytes_sent_per_worker"] / 1e6, "MB sent per worker"),
        ("accuracy_vs_time.png", lambda p: p["compute_seconds"] + p["bytes_sent_per_worker"] / bandwidth,
         f"modeled seconds (compute + bytes at {bandwidth * 8 / 1e9:g} Gbit/s)"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for k, (method, rs) in enumerate(runs.items()):
            for i, r in enumerate(rs):
                xs = [x_of(p) for p in r["history"]]
                ax.plot(xs, [p["accuracy"] for p in r["history"]], marker="o", markersize=3,
                        label=method if i == 0 else None, color=COLORS.get(method, f"C{4 + k}"))
        ax.set_xscale("symlog" if "bytes" in name else "linear")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)
    return paths


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS))
    ap.add_argument("--num-subnets", type=int, default=2, help="also the number of workers (G = 1)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS[:3]))
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=128, help="per worker")
    ap.add_argument("--local-steps", type=int, default=50, help="IST's and LocalSGD's steps between syncs")
    ap.add_argument("--lr", type=float, default=None, help="default: the recipe's")
    ap.add_argument("--eval-every", type=int, default=100, help="steps between points of the accuracy curves")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--bandwidth-gbps", type=float, default=10.0, help="link bandwidth for the modeled time")
    ap.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL (accelerate launch --multi_gpu)")
    ap.add_argument("--ist-args", action="append", default=[], help="a recipe argument for the ist runs only, "
                    "repeatable: --ist-args=--stages=all --ist-args=--min-blocks=1")
    ap.add_argument("--ist-name", default="ist", help="the ist runs' row name (and run folders), to set an IST "
                    "variant beside plain IST: --ist-name ist_outer --ist-args=--outer-lr=0.7 ... --merge")
    ap.add_argument("--merge", action="store_true", help="keep the rows of OUT/<task>_S<n>/results.json whose "
                    "methods this invocation does not run (one table from several invocations)")
    ap.add_argument("--network", nargs="+", default=[], metavar="NxRATE",
                    help="run every method across N shaped network nodes per spec (benchmarks/network.py; root), "
                         "e.g. 4xnone 4x1gbit 4x100mbit 4x20mbit: measured time to accuracy, kernel byte counts")
    ap.add_argument("--train-seconds", type=float, default=0.0, help="--network: each run's training budget")
    ap.add_argument("--made-only", action="store_true",
                    help="--network: summarize the runs already made with these flags; run nothing (a seed "
                         "made at some rates only is left out at the others)")
    ap.add_argument("--target", type=float, nargs="+", default=[0.0],
                    help="--network: the common target accuracy (default: the lowest best accuracy of all runs); "
                         "more than one: a table for each, the first in results.json's rates")
    ap.add_argument("--split", default="iid", help="iid (one set sharded over the workers, as before), "
                    "dirichlet:ALPHA or classes:K: each worker trains on its own part of a seeded partition of the "
                    "training set, the same for every method and seed (recipes' --split); the test set stays shared")
    ap.add_argument("--split-seed", type=int, default=0, help="seed of --split's partition")
    ap.add_argument("--out", default="bench")
    ap.add_argument("--refresh", nargs="+", type=Path, default=[], metavar="DIR",
                    help="summarize these result folders again from the runs they hold (run nothing; --task is "
                         "then not needed)")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more arguments for the recipe")
    args = ap.parse_args(argv)
    if args.refresh:
        missing = [str(folder) for folder in args.refresh if not (folder / "results.json").is_file()]
        if missing:
            raise SystemExit(f"--refresh: no results.json in {', '.join(missing)} (give folders compare.py wrote)")
        return {str(folder): refresh(folder) for folder in args.refresh}
    if args.task is None:
        ap.error("--task is required (unless --refresh)")
    args.extra = [a for a in args.extra if a != "--"]
    try:
        args.split = parse_split(args.split)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if args.ist_name in METHODS[:2] + METHODS[3:] or not args.ist_name.replace("_", "").isalnum():
        raise SystemExit(f"--ist-name {args.ist_name!r}: use letters, digits and '_', not a baseline's name")
    if args.eval_every % args.local_steps:
        raise SystemExit(f"--eval-every {args.eval_every} must be a multiple of --local-steps {args.local_steps}")
    if args.network:
        if args.split.kind != "iid":
            raise SystemExit("--split with --network: not supported yet (benchmarks/network.py's folders do not name "
                             "the split); run the skewed comparison without --network")
        import network

        return network.main(args, recipe_command)
    bandwidth = args.bandwidth_gbps * 1e9 / 8
    out = Path(args.out) / (f"{args.task}_S{args.num_subnets}" + ("" if args.split.kind == "iid" else f"_{args.split.slug}"))
    runs: dict[str, list[dict]] = {}
    names = {m: args.ist_name if m == "ist" else m for m in args.methods}
    if args.merge and (out / "results.json").exists():
        earlier = json.loads((out / "results.json").read_text())
        differs = {k: (earlier[k], getattr(args, k)) for k in ("epochs", "batch_size", "local_steps")
                   if earlier[k] != getattr(args, k)}
        if earlier.get("split", "iid") != str(args.split):
            differs["split"] = (earlier.get("split", "iid"), str(args.split))
        if differs:
            raise SystemExit(f"--merge: {out / 'results.json'} was run with other settings "
                             f"(earlier, now): {differs}; merge only runs of the same budget")
        kept = {m: rs for m, rs in earlier["runs"].items() if m not in names.values()}
        runs.update(kept)
        print(f"== merging {', '.join(kept) or 'nothing'} from {out / 'results.json'}", flush=True)
    # IST first: a setting the model cannot take fails at once, not after the baselines ran
    for method in sorted(args.methods, key=lambda m: m != "ist"):
        for seed in args.seeds:
            name = names[method]
            runs.setdefault(name, []).append(launch(args.task, method, seed, args, out / "runs" / f"{name}_seed{seed}"))
    runs = dict(sorted(runs.items(), key=lambda kv: METHODS.index(kv[0]) if kv[0] in METHODS else len(METHODS)))
    rows, target = summarize(runs, bandwidth, args.batch_size)
    text = table(rows, target, bandwidth)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"task": args.task, "num_subnets": args.num_subnets, "split": str(args.split),
               "split_seed": args.split_seed, "epochs": args.epochs, "seeds": args.seeds,
               "batch_size": args.batch_size, "local_steps": args.local_steps, "bandwidth_gbps": args.bandwidth_gbps,
               "accuracy_target": target, "rows": rows,
               "runs": {m: [slim(r) for r in rs] for m, rs in runs.items()}}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "table.md").write_text(text + "\n")
    plot(runs, bandwidth, out, f"{args.task}, {args.num_subnets} workers"
         + ("" if args.split.kind == "iid" else f", split {args.split}"))
    print(text)
    return summary


if __name__ == "__main__":
    main()
