"""Issue 17, item 4: the evaluation-scaling choice, offline, on a finished ``recipes/ist_mlp.py``
or ``recipes/resist_cifar.py`` run.

The global model is scored in its evaluation view, where every partitioned unit is scaled:
ResIST multiplies each partitioned block's residual branch by ``max(1/S, m/N)`` (Dun et al.,
arXiv 2107.00961, Sec. 3), IST the inputs of cut layers by ``1/S`` (Yuan et al., arXiv
1910.02120, Sec. 3). The exported model (``output_dir/model``) holds that scaling folded into
its weights; this script refolds it to each of ``--factors`` (1 = no scaling) and scores the
split the run scored (its ``--val-split`` held-out part, or the test set). Training does not
depend on the factor, so one run scores every choice: pick on a held-out run, confirm on test.

    python benchmarks/eval_scaling.py runs/ist_seed0 --factors 0.25 0.5 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from batchnorm_reestimate import _flag, accuracy, load_run

from ist_accel.decompositions import decompose
from ist_accel.decompositions.scaling import fold_scalings
from ist_accel.recipe import add_training_args, ist_config


def run_config(command: list[str]):
    """The run's ISTConfig, parsed from its command by the recipes' own training flags."""
    recipe_at = next(i for i, a in enumerate(command) if a.endswith(".py"))
    parser = argparse.ArgumentParser(add_help=False)
    add_training_args(parser)
    args, _ = parser.parse_known_args(command[recipe_at + 1:])
    if args.method != "ist":
        raise SystemExit(f"the run's --method is {args.method!r}: only an ist run has an evaluation scaling")
    world = int(_flag(command, "--num_processes", "1"))  # the recipes' defaults: S = world / G, G = world / S or 1
    args.group_size = args.group_size or (world // args.num_subnets if args.num_subnets else 1)
    args.num_subnets = args.num_subnets or world // args.group_size
    folded, args.no_eval_scaling = not args.no_eval_scaling, False
    return ist_config(args), folded


def rescaled(model, saved: dict, decomposition, factor: float, folded: bool) -> dict:
    """``saved`` with every partitioned unit's folded scaling replaced by ``factor``."""
    change = [(name, factor / (f if folded else 1.0), where) for name, f, where in decomposition.eval_scalings()]
    return fold_scalings(model, saved, change)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="an ist run's output folder (command.json, model/)")
    p.add_argument("--factors", type=float, nargs="+", default=[0.25, 0.5, 1.0],
                   help="evaluation scalings to score (1 = none)")
    args = p.parse_args(argv)
    bad = [f for f in args.factors if not f > 0 or f == float("inf")]
    if bad:
        raise SystemExit(f"--factors must be finite and > 0, got {bad[0]!r}")
    if not (args.run / "command.json").is_file() or not (args.run / "model").is_dir():
        raise SystemExit(f"{args.run}: not a finished run folder; accepted: a recipe's --output-dir with "
                         "command.json and model/ (compare.py's runs/<method>_seed<n>)")
    config, folded = run_config(json.loads((args.run / "command.json").read_text()))  # refuse before loading data
    command, model, saved, _, test = load_run(args.run)
    decomposition = decompose(model, config)
    out = {"run": str(args.run), "split": "held-out train" if float(_flag(command, "--val-split", "0")) else "test",
           "run_factors": sorted({f for _, f, _ in decomposition.eval_scalings()}) if folded else [1.0]}
    for factor in args.factors:
        model.load_state_dict(rescaled(model, saved, decomposition, factor, folded))
        out[f"factor_{factor:g}"] = accuracy(model, test)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
