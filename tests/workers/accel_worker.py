"""A worker for ISTAccelerator tests: an ordinary Accelerate loop (gradient accumulation,
clipping, an lr scheduler) on deterministic micro-batches; rank 0 saves the global model,
the global model's outputs on the eval items, and what the scheduler set."""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
DILOCO = {"outer_lr": 0.7, "outer_momentum": 0.9, "outer_nesterov": True}
from common import batch_for, eval_items, loss_fn, make_model  # noqa: E402

from ist_accel import ISTAccelerator, ISTConfig  # noqa: E402
from ist_accel.norm_statistics import recomputed_batchnorm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--num-subnets", type=int, required=True)
    ap.add_argument("--group-size", type=int, default=1)
    ap.add_argument("--policy", default="reset")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=0, help="data-parallel warm-up steps before IST")
    ap.add_argument("--mixed-precision", default="no")
    ap.add_argument("--zero-stage", type=int, default=0, help="DeepSpeed ZeRO stage inside each group (0: no DeepSpeed)")
    ap.add_argument("--partial", type=int, default=0, help="optimizer steps after the last round; end_training syncs them")
    ap.add_argument("--recompute-bn", type=int, default=0,
                    help="also score with BatchNorm statistics recomputed over this many batches per rank (rank r's "
                         "inputs shifted by r: the ranks' data differ)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                    help="the model's and batches' dtype (float64: exact checks, wire fp64)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(1)
    policy, _, outer = args.policy.partition("-")  # "carry-diloco": DiLoCo's outer step
    config = ISTConfig(num_subnets=args.num_subnets, group_size=args.group_size, local_steps=args.local_steps,
                       optimizer_state=policy, seed=5, wire_dtype="fp64" if dtype == torch.float64 else "fp32",
                       **(DILOCO if outer == "diloco" else {}))
    kwargs = {"cpu": True}
    if args.zero_stage:  # clipping moves into DeepSpeed's config; partition even these tiny tensors
        from accelerate.utils import DeepSpeedPlugin

        batch = len(batch_for(args.model, 0, 0, 0)[1])
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config={
            "train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": args.accum,
            "gradient_clipping": 1.0, "steps_per_print": 10**9,
            "zero_optimization": {"stage": args.zero_stage, "stage3_param_persistence_threshold": 0}})
    accelerator = ISTAccelerator(config, gradient_accumulation_steps=args.accum, dense_warmup_steps=args.warmup,
                                 mixed_precision=args.mixed_precision, **kwargs)
    world = accelerator.num_processes
    model = make_model(args.model, dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # Accelerate steps a scheduler once per process per optimizer step: halve the lr every round
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.5 ** (e // (args.local_steps * world)))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    s, g = divmod(accelerator.process_index, args.group_size)
    lrs = []
    for t in range(args.warmup + args.rounds * args.local_steps + args.partial):
        warm = t < args.warmup
        assert accelerator.in_warmup == warm
        for k in range(args.accum):
            with accelerator.accumulate(model):
                if warm:  # data parallel over all ranks: rank r's own batches
                    batch = batch_for(args.model, accelerator.process_index, 0, 90 + t * args.accum + k, dtype)
                else:
                    batch = batch_for(args.model, s, g, (t - args.warmup) * args.accum + k, dtype)
                loss = loss_fn(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
        lrs.append(optimizer.param_groups[0]["lr"])
    before = accelerator.get_state_dict(model)  # with --partial: mid-round, the model a sync now would give
    model.eval()
    with torch.no_grad():
        logits = model(torch.stack([x for x, _ in eval_items(args.model, dtype)]))
    recomputed = {}
    if args.recompute_bn:
        rank = accelerator.process_index
        batches = [batch_for(args.model, 20 + rank, 0, k, dtype)[0] + rank for k in range(args.recompute_bn)]
        xs = torch.stack([x for x, _ in eval_items(args.model, dtype)])
        with recomputed_batchnorm(model, batches), torch.no_grad():
            recomputed["logits_bn"] = model(xs)
        with torch.no_grad():
            recomputed["logits_after"] = model(xs)  # the trained statistics are back
    model.train()
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        torch.save({"global": {k: v.clone() for k, v in state.items()}, "before": before, "logits": logits, **recomputed}, os.path.join(args.out, "global.pt"))
    zero = {}
    if args.zero_stage:
        tensors = accelerator.ist.tensors
        zero = {"optimizer_state_elements": tensors.optimizer_state_elements(),
                "state_keys": tensors.element_state_keys(), "subnet_numel": accelerator.ist.subnet_numel(),
                "zero_stage": accelerator.zero_engine.zero_optimization_stage(),
                "dp_world_size": accelerator.zero_engine.dp_world_size}
    accelerator.wait_for_everyone()
    accelerator.end_training()  # syncs a round in progress (--partial), then ends the run
    with open(os.path.join(args.out, f"rank{accelerator.process_index}.json"), "w") as f:
        json.dump({"lrs": lrs, "rounds": accelerator.ist.round, "steps": accelerator.ist.steps,
                   "micro_batches": args.rounds * args.local_steps * args.accum, **zero}, f)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
