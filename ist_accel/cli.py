"""The ``ist-accel`` console script."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .config import DECOMPOSITIONS, ISTConfig


def _plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="the cost report of an IST configuration: sizes, bytes per round, memory per rank")
    p.add_argument("--model", required=True, help="e.g. preact_resnet101, resnet50, timm:resnet50, mlp")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--num-subnets", type=int, required=True)
    p.add_argument("--min-blocks", type=int, default=0)
    p.add_argument("--group-size", type=int, default=1)
    p.add_argument("--stages", default="longest", help="longest | all | layer3:1-22,...")
    p.add_argument("--decomposition", default="auto", choices=DECOMPOSITIONS)
    p.add_argument("--stem", default=None, choices=["cifar", "imagenet"], help="pre-activation ResNets only")
    p.add_argument("--in-features", type=int, default=784, help="mlp only")
    p.add_argument("--hidden", default="1024,1024", help="mlp only: comma-separated widths")
    p.add_argument("--optimizer-slots", type=int, default=1,
                   help="optimizer state tensors per parameter: 1 SGD with momentum (default), 2 Adam, 0 plain SGD")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_plan(args: argparse.Namespace) -> int:
    from .models import build_model
    from .cost import cost_report

    config = ISTConfig(
        num_subnets=args.num_subnets, min_blocks=args.min_blocks, group_size=args.group_size,
        stages=args.stages, decomposition=args.decomposition,
    )
    kwargs = {}
    if args.model == "mlp":
        kwargs = {"in_features": args.in_features, "hidden": [int(h) for h in args.hidden.split(",")]}
    elif args.stem is not None:
        kwargs = {"stem": args.stem}
    import torch

    with torch.device("meta"):  # sizes only: a model of any size costs no memory here
        model = build_model(args.model, args.num_classes, **kwargs)
    report = cost_report(model, config, name=args.model, optimizer_slots=args.optimizer_slots)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_markdown())
    return 0


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a short ResIST training on the embedded synthetic image set")
    p.add_argument("--arch", default="preact_resnet20")
    p.add_argument("--num-subnets", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.arch, args.num_subnets, args.local_steps, args.rounds, seed=args.seed)
    print(f"ResIST {args.arch}, {args.num_subnets} subnets, {result.rounds} rounds x {args.local_steps} "
          f"local steps: test accuracy {result.accuracy:.1%} ({result.seconds:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ist-accel", description="Independent Subnet Training tools")
    sub = parser.add_subparsers(dest="command", required=True)
    _plan_parser(sub)
    _demo_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return _run_plan(args) if args.command == "plan" else _run_demo(args)
    except ValueError as err:
        print(f"ist-accel {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
