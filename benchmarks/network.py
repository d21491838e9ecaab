"""Time to accuracy on shaped links: ``benchmarks/compare.py --network NxRATE ...`` (issue 36).

Every method runs as a multi-node user runs it: one ``accelerate launch --num_machines N
--machine_rank i --main_process_ip <node 0>`` per node of a :class:`netbed.Netbed` (one worker
per node, gloo over ``eth0``, ``launch_configs/cpu_nodes.yaml``), for a training budget of
``--train-seconds`` wall-clock (evaluation excluded). Each run's accuracy curve is read against
the same clock for every method (``wall_seconds`` of the recipes' history: syncs included), and
each node's ``eth0`` byte counters are read by the kernel before and after, minus the idle
baseline, beside the bytes the run reports. Per rate and method the summary has
``wall_seconds_to_target`` (per seed; null where the budget ran out first),
``accuracy_at_budget``, ``kernel_tx_bytes_per_node``, ``reported_bytes_per_worker``, and the
modeled time to target beside the measured one: the unshaped run's wall-clock to the target (or,
without one, the fastest link's, less its own bytes at its rate) plus its exchange bytes at the rate.

    python benchmarks/compare.py --task mnist --num-subnets 4 --methods ddp localsgd diloco ist \\
        --epochs 100 --local-steps 20 --eval-every 40 --network 4xnone 4x1gbit 4x100mbit 4x20mbit \\
        --train-seconds 120 --target 0.95 --out docs/bench
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netbed import Netbed, check_host, rate_bits  # noqa: E402
from network_summary import summarize, table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
IDLE_SECONDS = 2.0  # the idle baseline: each node's counters over this long before the launch


def parse_network(spec: str) -> tuple[int, str]:
    """``"4x100mbit"`` -> (4, "100mbit"); ``"4xnone"``: 4 nodes, links not shaped."""
    nodes, _, rate = spec.partition("x")
    if not nodes.isdigit() or int(nodes) < 1:
        raise SystemExit(f"--network {spec!r}: give NODESxRATE, e.g. 4x100mbit, 4x1gbit or 4xnone")
    try:
        rate_bits(rate)
    except ValueError as error:
        raise SystemExit(f"--network {spec!r}: {error}") from None
    return int(nodes), rate


def node_command(recipe: list[str], nodes: int, node: int, master: str) -> list[str]:
    """One node's launcher, as in launch_configs/cpu_nodes.yaml's comment."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "launch_configs" / "cpu_nodes.yaml"), "--num_machines", str(nodes), "--machine_rank", str(node),
            "--main_process_ip", master, "--main_process_port", "29511", "--num_processes", str(nodes), *recipe]


def made(recipe: list[str], out: Path, nodes: int, rate: str) -> bool:
    """Whether ``out`` holds a finished run of exactly this command."""
    recorded = out / "command.json"
    return (out / "results.json").exists() and recorded.exists() and \
        json.loads(recorded.read_text()) == {"recipe": recipe, "nodes": nodes, "rate": rate}


def run_on_network(recipe: list[str], out: Path, nodes: int, rate: str, timeout: float) -> dict[str, Any]:
    """Run ``recipe`` (its arguments; ``--output-dir out``) on ``nodes`` shaped nodes; returns its
    results.json with a ``network`` record added. A run with the same command is reused."""
    results = out / "results.json"
    if made(recipe, out, nodes, rate):
        print(f"== reusing {results}", flush=True)
        return json.loads(results.read_text())
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    out.mkdir(parents=True, exist_ok=True)
    with Netbed(nodes, rate) as net:
        idle_start = net.counters()
        time.sleep(IDLE_SECONDS)
        before = net.counters()
        started = time.monotonic()
        logs = [open(out / f"node{i}.log", "w") for i in range(nodes)]
        procs = [net.popen(i, node_command(recipe, nodes, i, net.address(0)), env=env, stdout=logs[i],
                           stderr=subprocess.STDOUT, cwd=ROOT) for i in range(nodes)]
        try:
            codes = [p.wait(timeout=max(1.0, started + timeout - time.monotonic())) for p in procs]
        except subprocess.TimeoutExpired:
            raise SystemExit(f"{out}: a node ran past {timeout:.0f} s; see {out}/node*.log") from None
        finally:
            for f in logs:
                f.close()
        elapsed = time.monotonic() - started
        after = net.counters()
    if any(codes) or not results.exists():
        raise SystemExit(f"{out}: nodes exited {codes}; see {out}/node*.log")
    run = json.loads(results.read_text())
    idle = [(b["tx_bytes"] - a["tx_bytes"]) / IDLE_SECONDS for a, b in zip(idle_start, before)]
    run["network"] = {
        "nodes": nodes, "rate": rate, "elapsed_seconds": elapsed,
        "kernel_tx_bytes_per_node": [a["tx_bytes"] - b["tx_bytes"] - i * elapsed for a, b, i in zip(after, before, idle)],
        "kernel_rx_bytes_per_node": [a["rx_bytes"] - b["rx_bytes"] for a, b in zip(after, before)],
        "idle_tx_bytes_per_second": idle,
    }
    results.write_text(json.dumps(run, indent=1))
    (out / "command.json").write_text(json.dumps({"recipe": recipe, "nodes": nodes, "rate": rate}))
    return run


def plot(runs: dict[str, dict[str, list[dict]]], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compare import COLORS

    paths = []
    for rate, by_method in runs.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for k, (method, rs) in enumerate(by_method.items()):
            for i, r in enumerate(rs):
                ax.plot([p["wall_seconds"] for p in r["history"]], [p["accuracy"] for p in r["history"]], marker="o",
                        markersize=3, label=method if i == 0 else None, color=COLORS.get(method, f"C{4 + k}"))
        ax.set_xlabel("training wall-clock, s (syncs included, evaluation excluded)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{title}, {rate} per link")
        ax.legend()
        fig.tight_layout()
        paths.append(out / f"accuracy_vs_wall_{rate}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def probe_link(out: Path, nodes: int, rate: str, made_only: bool) -> dict | None:
    """What each pattern gets of ``rate`` (benchmarks/linkprobe.py), measured once per shape and
    kept beside the runs; None where it was never measured and ``made_only``."""
    path = out / "probes" / f"{nodes}x{rate}.json"
    if path.exists():
        return json.loads(path.read_text())
    if made_only:
        return None
    from linkprobe import probe

    record = probe(nodes, rate, megabytes=4.0, repeats=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return record


def main(args: argparse.Namespace, recipe_command) -> dict[str, Any]:
    """compare.py's ``--network`` mode: every method at every rate, then the summary files."""
    specs = [parse_network(s) for s in args.network]
    if any(n != args.num_subnets for n, _ in specs):
        raise SystemExit(f"--network: one worker per node, so the nodes must equal --num-subnets {args.num_subnets}")
    if not (math.isfinite(args.train_seconds) and args.train_seconds > 0):
        raise SystemExit(f"--network needs --train-seconds, each method's training budget in seconds > 0; "
                         f"got {args.train_seconds}")
    if not all(0 <= t < 1 for t in args.target):
        raise SystemExit(f"--target is an accuracy in [0, 1) (0: the lowest best accuracy of all runs); got {args.target}")
    try:
        if not args.made_only:
            check_host()
    except RuntimeError as error:
        raise SystemExit(f"--network: {error}") from None
    out = Path(args.out) / "network" / args.task
    runs: dict[str, dict[str, list[dict]]] = {}
    names = {m: args.ist_name if m == "ist" else m for m in args.methods}
    if not args.made_only:
        Netbed.sweep()
    for nodes, rate in specs:
        for method in sorted(args.methods, key=lambda m: m != "ist"):
            for seed in args.seeds:
                name = names[method]
                run_dir = out / "runs" / f"{rate}_{name}_seed{seed}"
                recipe = [*recipe_command(args.task, method, seed, args, run_dir), "--train-seconds", str(args.train_seconds)]
                if args.made_only and not made(recipe, run_dir, nodes, rate):
                    print(f"== {args.task} {nodes}x{rate} {name} seed {seed}: not made, left out", flush=True)
                    continue
                print(f"== {args.task} {nodes}x{rate} {name} seed {seed}", flush=True)
                run = run_on_network(recipe, run_dir, nodes, rate, timeout=3 * args.train_seconds + 900)
                runs.setdefault(rate, {}).setdefault(name, []).append(run)
    probes = {rate: probe_link(out, nodes, rate, args.made_only) for nodes, rate in specs if rate_bits(rate)}
    probes = {rate: record for rate, record in probes.items() if record}
    if not runs:
        raise SystemExit(f"--made-only: no run under {out / 'runs'} was made with these flags")
    lowest_best = min(max(p["accuracy"] for p in r["history"])
                      for by_method in runs.values() for rs in by_method.values() for r in rs)
    targets = [t or lowest_best for t in args.target]
    summaries = {t: summarize(runs, t, args.train_seconds, probes) for t in targets}
    target, summary = targets[0], summaries[targets[0]]
    text = "\n".join(f"\n## target {t:g}\n" + table(summaries[t], t, args.train_seconds) for t in targets)
    result = {"task": args.task, "num_subnets": args.num_subnets, "seeds": args.seeds, "batch_size": args.batch_size,
              "local_steps": args.local_steps, "eval_every": args.eval_every, "target": target,
              "budget_seconds": args.train_seconds, "ist_args": args.ist_args, "extra": args.extra,
              "rates": summary, "probes": probes, "other_targets": {str(t): summaries[t] for t in targets[1:]},
              "runs": {rate: {m: [{k: v for k, v in r.items() if k != "ist_config"} for r in rs]
                              for m, rs in by_method.items()} for rate, by_method in runs.items()}}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "table.md").write_text(text + "\n")
    plot(runs, out, f"{args.task}, {args.num_subnets} nodes")
    print(text)
    return result
