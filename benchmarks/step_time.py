#!/usr/bin/env python
"""How much slower a worker's training step is here than on a GPU: what a link here stands for.

Time matters as a step's compute against its communication, so a link of B here plays the part
of a link ``factor x B`` between GPU nodes, where ``factor`` = this machine's step time / the
GPU's for the same model and batch (issue 36's note). This script times one SGD step (forward,
backward, momentum step; random inputs, so no data loading) of a model as the benchmark's
workers run it: ``--workers`` processes at once, one thread each, sharing this machine's cores.

The published reference is ResIST's Table 3 (Dun et al., arXiv 2107.00961;
github.com/dunchen/ResIST_release): local SGD on 4 V100s of one AWS p3.8xlarge trains their
pre-activation ResNet-101 (basic blocks [3, 4, 23, 3], widths 64-512, 3x3 stem; CIFAR-10) for
40 epochs of 391 steps of batch 128 per GPU (no sampler: every worker passes over all 50,000
images; a sync every 50 steps) in 5486 s, 0.351 s a step; ResIST in 1532 s, 0.098 s a step.
``--model resist101`` builds that network.

    python benchmarks/step_time.py --model resist101 --batch 128 --workers 4 --steps 2
    python benchmarks/step_time.py --model preact_resnet32 --batch 64 --workers 4 --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESIST_LOCAL_SGD_SECONDS_PER_STEP = 5486 / (40 * 391)  # ResIST Table 3, CIFAR-10, 4 V100s, batch 128


def build(name: str):
    from ist_accel.models import build_model
    from ist_accel.models.preact_resnet import PreActBasicBlock, PreActResNet

    if name == "resist101":  # ResIST's PreActResNet101: basic blocks, not bottlenecks
        return PreActResNet(PreActBasicBlock, [3, 4, 23, 3], num_classes=10, stem="cifar")
    return build_model(name, num_classes=10)


def worker(name: str, batch: int, steps: int) -> None:
    """One worker: ``steps`` timed steps after one untimed; prints the seconds as JSON."""
    import torch

    torch.manual_seed(0)
    model = build(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    seconds = []
    for i in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        if i:
            seconds.append(time.perf_counter() - start)
    print(json.dumps(seconds), flush=True)


def flops_per_step(name: str, batch: int) -> float:
    """Forward + backward FLOPs of one step, counted by torch (``FlopCounterMode``) on one image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = build(name)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 32, 32)).sum().backward()
    return counter.get_total_flops() * batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resist101", help="resist101 or a name build_model accepts")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=4, help="processes at once (the benchmark's workers)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per worker (after one untimed)")
    ap.add_argument("--json", help="write the record here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if min(args.batch, args.workers, args.steps) < 1:
        raise SystemExit(f"--batch, --workers and --steps must be >= 1; got {args.batch}, {args.workers}, {args.steps}")
    if args.worker:
        return worker(args.model, args.batch, args.steps)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--batch", str(args.batch),
           "--steps", str(args.steps)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(args.workers)]
    seconds = [s for p in procs for s in json.loads(p.communicate()[0].strip().splitlines()[-1])]
    if any(p.returncode for p in procs):
        raise SystemExit("a worker failed")
    step = statistics.median(seconds)
    record = {"model": args.model, "batch": args.batch, "workers": args.workers, "cores": os.cpu_count(),
              "seconds_per_step": step, "all_seconds": seconds, "flops_per_step": flops_per_step(args.model, args.batch)}
    if args.model == "resist101" and args.batch == 128:
        record["gpu_seconds_per_step"] = RESIST_LOCAL_SGD_SECONDS_PER_STEP
        record["factor"] = step / RESIST_LOCAL_SGD_SECONDS_PER_STEP
    print(json.dumps({k: v for k, v in record.items() if k != "all_seconds"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
