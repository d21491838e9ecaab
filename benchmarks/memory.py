#!/usr/bin/env python
"""A model no single worker can hold: IST trains it under a per-process memory cap, DDP and
Accelerate's LocalSGD cannot (IST, arXiv 1910.02120, Sec. 1: "storing only a portion of
network parameters on each device"; ResIST, arXiv 2107.00961: "never uses the full model").

The three methods run ``recipes/ist_mlp.py`` on MNIST (one ``accelerate launch`` each, 4
gloo workers, the same wide MLP built on the meta device: IST materializes each rank's
subnet and owner shard, the baselines the same initial values whole). This harness is the
memory cap: a watchdog reads every worker's peak RSS (``VmHWM`` in ``/proc``) every few
milliseconds and kills the run when one goes over (RLIMIT_AS is unreliable with torch).
The model is sized so its whole training state (parameters + gradients + momentum, fp32)
is above the cap. Each worker's memory is also counted from inside, by walking its live
tensors (``ist_accel.memory``), and compared with what ``ist-accel plan`` predicts.

    python benchmarks/memory.py --json docs/bench/memory.json
    python benchmarks/memory.py --table 2 4 8 --methods ist --json docs/bench/memory_table.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "datasets" / "mnist"
MIB = 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def predict(args: argparse.Namespace, num_subnets: int) -> dict[str, Any]:
    """``ist-accel plan``'s numbers for the run (the model on the meta device: no memory)."""
    import torch

    from ist_accel import ISTConfig
    from ist_accel.cost import cost_report
    from ist_accel.models import MLP

    with torch.device("meta"):
        model = MLP(784, args.hidden, 10, norm="batch")
    report = cost_report(model, ISTConfig(num_subnets=num_subnets, seed=args.seed), name="mlp", optimizer_slots=1)
    return {"model_params": report.model_params, "full_state_bytes": report.replica_memory,
            "rank_bytes": [m.total for m in report.rank_memory],
            "rank_detail": [{"subnet": m.subnet, "owner_shards": m.owner_shards, "buffers": m.buffers,
                             "plans": m.plans} for m in report.rank_memory]}


def command(args: argparse.Namespace, method: str, workers: int, out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "launch_configs" / "cpu.yaml"), "--num_processes", str(workers), "--main_process_port",
            str(free_port()), str(ROOT / "recipes" / "ist_mlp.py"), "--data", str(args.data), "--init", "meta",
            "--method", method, "--hidden", *map(str, args.hidden), "--max-steps", str(steps),
            "--local-steps", str(args.local_steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--eval-samples", str(args.eval_samples), "--seed", str(args.seed), "--output-dir", str(out),
            *(["--num-subnets", str(workers)] if method == "ist" else [])]


def _workers(launcher: psutil.Process) -> dict[int, psutil.Process]:
    """The launch's worker processes by rank (from their ``RANK``)."""
    out = {}
    for child in launcher.children(recursive=True):
        try:
            rank = child.environ().get("RANK")
            if rank is not None and "ist_mlp.py" in " ".join(child.cmdline()):
                out[int(rank)] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _peak(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_capped(cmd: list[str], cap: int, workers: int, timeout: float, poll: float, log: Path) -> dict[str, Any]:
    """Run one launch under the cap: peak RSS per rank, and whether (and which) rank went over."""
    # MALLOC_MMAP_THRESHOLD_: glibc serves every allocation of 1 MiB or more (every large tensor) by mmap and
    # returns it on free, so RSS follows the live tensors instead of the heap's fragmentation (all methods alike)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "MALLOC_MMAP_THRESHOLD_": str(MIB)}
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    launcher = psutil.Process(proc.pid)
    peaks: dict[int, int] = {}
    over: tuple[int, int, float] | None = None
    known: dict[int, psutil.Process] = {}
    while proc.poll() is None:
        if len(known) < workers:
            known.update(_workers(launcher))
        for rank, p in known.items():
            peak = _peak(p.pid)
            if peak is not None:
                peaks[rank] = max(peaks.get(rank, 0), peak)
                if peak > cap and over is None:
                    over = (rank, peak, time.monotonic() - started)
        if over is not None or time.monotonic() - started > timeout:
            for p in [*known.values(), *launcher.children(recursive=True), launcher]:
                try:
                    p.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass
            proc.wait()
            break
        time.sleep(poll)
    seconds = time.monotonic() - started
    error = None
    if over is not None:
        rank, peak, at = over
        error = (f"rank {rank} went over the cap after {at:.1f} s: peak RSS {peak / MIB:,.0f} MiB > "
                 f"{cap / MIB:,.0f} MiB; the run was killed")
    elif seconds > timeout:
        error = f"timed out after {timeout:.0f} s"
    elif proc.returncode != 0:
        error = f"exit code {proc.returncode}: " + log.read_text()[-600:].strip().replace("\n", " | ")
    return {"error": error, "peak_rss_bytes": [peaks.get(r) for r in range(workers)], "seconds": seconds}


def run_method(args: argparse.Namespace, method: str, workers: int, steps: int, tag: str, cap_mib: int) -> dict[str, Any]:
    out = Path(args.runs) / tag
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    print(f"== {tag}: {workers} workers, cap {cap_mib} MiB", flush=True)
    r = run_capped(command(args, method, workers, out, steps), cap_mib * MIB, workers, args.timeout,
                   args.poll, out / "log.txt")
    results = out / "results.json"
    if r["error"] is None and not results.exists():
        r["error"] = "no results.json: " + (out / "log.txt").read_text()[-600:]
    got = json.loads(results.read_text()) if r["error"] is None else {}
    return {"ok": r["error"] is None, "error": r["error"], "peak_rss_bytes": r["peak_rss_bytes"],
            "state_bytes": got.get("state_bytes"), "live_tensor_bytes": got.get("live_tensor_bytes"),
            "final_accuracy": got.get("final_accuracy"), "steps": got.get("steps"), "seconds": round(r["seconds"], 1)}


def mib(x: float | None) -> str:
    return "-" if x is None else f"{x / MIB:,.0f}"


def report(result: dict[str, Any]) -> str:
    lines = [f"cap {mib(result['cap_bytes'])} MiB per process; whole training state of the model "
             f"{mib(result['full_state_bytes'])} MiB ({result['model_params']:,} parameters, fp32, SGD with momentum)",
             "", "| method | ok | peak RSS per rank, MiB | state per rank, MiB (live tensors) | predicted, MiB | "
             "accuracy | s |", "|---|---|---|---|---|---|---|"]
    for name, m in result["methods"].items():
        live = m["live_tensor_bytes"] or []
        predicted = result["predicted_rank_bytes"] if name == "ist" else [result["full_state_bytes"]]
        lines.append(f"| {name} | {'yes' if m['ok'] else 'no: ' + m['error'][:90]} | "
                     f"{' / '.join(mib(p) for p in m['peak_rss_bytes'])} | {' / '.join(mib(x) for x in live) or '-'} | "
                     f"{' / '.join(mib(x) for x in predicted)} | "
                     f"{'-' if m['final_accuracy'] is None else format(m['final_accuracy'], '.4f')} | {m['seconds']} |")
    if result.get("ist_measured_over_predicted"):
        lines += ["", "IST live tensors / predicted per rank: " +
                  " / ".join(f"{x:.3f}" for x in result["ist_measured_over_predicted"])]
    return "\n".join(lines)


def table_report(rows: list[dict[str, Any]]) -> str:
    lines = ["| S | model MiB (params) | predicted per rank, MiB | live tensors per rank, MiB | measured / predicted | "
             "peak RSS per rank, MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        live = r["live_tensor_bytes"] or [None]
        ratio = max(abs(a / b - 1) for a, b in zip(live, r["predicted_rank_bytes"])) if live[0] else None
        lines.append(f"| {r['num_subnets']} | {mib(r['model_params'] * 4)} | {mib(max(r['predicted_rank_bytes']))} | "
                     f"{mib(max(live)) if live[0] else '-'} | {'-' if ratio is None else f'within {ratio:.1%}'} | "
                     f"{mib(max(p or 0 for p in r['peak_rss_bytes']))}{'' if r['ok'] else ' (' + r['error'][:60] + ')'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA, help="MNIST idx files")
    ap.add_argument("--hidden", type=int, nargs="+", default=[8192] * 4)
    ap.add_argument("--cap-mib", type=int, default=2304, help="per-process peak RSS cap")
    ap.add_argument("--workers", type=int, default=4, help="workers per method (IST: S = workers)")
    ap.add_argument("--methods", nargs="+", default=["ist", "ddp", "localsgd"], choices=["ist", "ddp", "localsgd"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table", type=int, nargs="*", default=[], help="also IST at these S (S workers each)")
    ap.add_argument("--table-steps", type=int, default=20)
    ap.add_argument("--table-cap-mib", type=int, default=16384, help="the table measures memory against S: a loose cap")
    ap.add_argument("--timeout", type=float, default=480, help="seconds per launch")
    ap.add_argument("--poll", type=float, default=0.01, help="seconds between the watchdog's reads")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "memory"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.cap_mib <= 0 or args.workers < 1 or args.steps < 1 or any(h < 1 for h in args.hidden):
        raise SystemExit(f"--cap-mib, --workers, --steps and --hidden must be positive, got {args.cap_mib}, "
                         f"{args.workers}, {args.steps}, {args.hidden}")
    if not args.data.exists():
        raise SystemExit(f"--data {args.data}: no such folder (MNIST idx files; ../shared/datasets/mnist)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
    predicted = predict(args, args.workers)
    result: dict[str, Any] = {"cap_bytes": args.cap_mib * MIB, "full_state_bytes": predicted["full_state_bytes"],
                              "model_params": predicted["model_params"], "hidden": args.hidden,
                              "workers": args.workers, "steps": args.steps,
                              "predicted_rank_bytes": predicted["rank_bytes"],
                              "predicted_rank_detail": predicted["rank_detail"], "methods": {}}
    for method in args.methods:
        result["methods"][method] = run_method(args, method, args.workers, args.steps, method, args.cap_mib)
    if "ist" in result["methods"] and result["methods"]["ist"]["live_tensor_bytes"]:
        live = result["methods"]["ist"]["live_tensor_bytes"]
        result["ist_measured_over_predicted"] = [a / b for a, b in zip(live, predicted["rank_bytes"])]
    print(report(result))
    if args.table:
        rows = []
        for S in args.table:
            p = predict(args, S)
            m = run_method(args, "ist", S, args.table_steps, f"ist_S{S}", args.table_cap_mib)
            rows.append({"num_subnets": S, "model_params": p["model_params"], "predicted_rank_bytes": p["rank_bytes"],
                         **m})
        result["table"] = rows
        print(table_report(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
