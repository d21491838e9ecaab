#!/usr/bin/env python
"""What a shaped link delivers to each communication pattern the methods use (issue 36).

The modeled time to target adds a run's bytes at the nominal rate. Whether a pattern moves its
bytes at that rate is measured here, on a :class:`netbed.Netbed` of the same shape, with gloo
over ``eth0`` as the runs use it:

- ``pair``: node 0 sends to node 1 alone (one TCP flow; the link's raw goodput),
- ``ring all-reduce``: DDP's, LocalSGD's and DiLoCo's collective (2 (N-1)/N of the buffer per node),
- ``all-to-all``: IST's exchange, a message to every peer at once: as the engine posts it
  (``Transport.point_to_point``), with the sends or the receives posted first, and gloo's own
  ``all_to_all_single``.

Per pattern: seconds (median of repeats), the bytes each node sends, and the effective rate
(those bytes over the seconds) as a fraction of the nominal one.

    python benchmarks/linkprobe.py --nodes 4 --rate 20mbit --megabytes 4 --json out.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netbed import Netbed, rate_bits  # noqa: E402


def worker(megabytes: float, repeats: int) -> None:
    """One node's side: run every pattern ``repeats`` times; node 0 prints the JSON record."""
    import torch
    import torch.distributed as dist

    from ist_accel.topology import Topology
    from ist_accel.transport import Transport

    dist.init_process_group("gloo", rank=int(os.environ["NODE_RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    rank, world = dist.get_rank(), dist.get_world_size()
    numel = int(megabytes * 1e6 / 4)
    buffer = torch.ones(numel)
    piece = numel // (world - 1)

    def pair() -> None:
        if rank == 0:
            dist.send(buffer, 1)
        elif rank == 1:
            dist.recv(buffer, 0)

    transport = Transport(Topology(world, 1, timeout=300))

    def engine() -> None:  # IST's round end: a message to every peer at once, through the engine's door
        transport.point_to_point({p: buffer[:piece] for p in range(world) if p != rank},
                                 {p: torch.empty(piece) for p in range(world) if p != rank}, "exchange")

    def posted(receives_first: bool) -> None:  # a message to every peer at once, straight through gloo
        peers = [p for p in range(world) if p != rank]
        sends = [dist.P2POp(dist.isend, buffer[:piece], p) for p in peers]
        receives = [dist.P2POp(dist.irecv, torch.empty(piece), p) for p in peers]
        for work in dist.batch_isend_irecv(receives + sends if receives_first else sends + receives):
            work.wait()

    whole = torch.ones(piece * world)  # a piece for every rank, its own included (not sent)

    def gloo_all_to_all() -> None:
        dist.all_to_all_single(torch.empty_like(whole), whole)

    spread = piece * 4 * (world - 1)
    runs = {"pair": (pair, numel * 4), "ring all-reduce": (lambda: dist.all_reduce(buffer), 2 * (world - 1) / world * numel * 4),
            "all-to-all, the engine's": (engine, spread), "all-to-all, sends posted first": (lambda: posted(False), spread),
            "all-to-all, receives posted first": (lambda: posted(True), spread), "all_to_all_single": (gloo_all_to_all, spread)}
    record = {}
    for name, (fn, sent) in runs.items():
        fn()  # warm: connections up, TCP past slow start
        seconds = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            fn()
            dist.barrier()
            seconds.append(time.perf_counter() - start)
        record[name] = {"seconds": statistics.median(seconds), "bytes_sent_per_node": sent}
    if rank == 0:
        print(json.dumps(record), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def probe(nodes: int, rate: str, megabytes: float = 4.0, repeats: int = 3, sysctls: dict | None = None) -> dict:
    """Bring up ``nodes`` shaped nodes, run :func:`worker` in each; per pattern the seconds and the
    effective rate as a fraction of ``rate``."""
    if nodes < 2:
        raise ValueError(f"nodes must be at least 2 (a pattern needs a peer), got {nodes}")
    with Netbed(nodes, rate, sysctls=sysctls) as net:
        env = {"WORLD_SIZE": str(nodes), "MASTER_PORT": "29533", "OMP_NUM_THREADS": "1"}
        procs = [net.popen(i, [sys.executable, __file__, "--worker", "--megabytes", str(megabytes),
                               "--repeats", str(repeats)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True) for i in range(nodes)]
        outputs = [p.communicate(timeout=600) for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("a probe node failed:\n" + "\n".join(err[-2000:] for _, err in outputs))
    record = json.loads(outputs[0][0].strip().splitlines()[-1])
    bits = rate_bits(rate)
    for r in record.values():
        r["effective_bits_per_second"] = r["bytes_sent_per_node"] * 8 / r["seconds"]
        r["of_nominal"] = r["effective_bits_per_second"] / bits if bits else None
    return {"nodes": nodes, "rate": rate, "megabytes": megabytes, "patterns": record}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--rate", default="20mbit")
    ap.add_argument("--megabytes", type=float, default=4.0, help="buffer per pattern (all-to-all: split over the peers)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the record here")
    ap.add_argument("--sysctl", action="append", default=[], help="KEY=VALUE set in every node (repeatable)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.megabytes, args.repeats)
    result = probe(args.nodes, args.rate, args.megabytes, args.repeats, dict(kv.split("=", 1) for kv in args.sysctl))
    for name, r in result["patterns"].items():
        share = "" if r["of_nominal"] is None else f", {r['of_nominal']:.0%} of {args.rate}"
        print(f"{name}: {r['seconds']:.3f} s for {r['bytes_sent_per_node'] / 1e6:.2f} MB per node "
              f"({r['effective_bits_per_second'] / 1e6:.1f} Mbit/s{share})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
