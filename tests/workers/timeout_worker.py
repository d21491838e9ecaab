"""Sets up IST the way a run does (``--mode``: ISTTrainer over TrainingArguments(use_cpu),
ISTAccelerator under DeepSpeed on CPU, or ISTAccelerator after the user's own
``init_process_group``) with ``sync_timeout`` = ``--timeout`` and writes, per rank, the
timeout of every process group that exists afterwards."""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from common import make_model  # noqa: E402

from ist_accel import ISTAccelerator, ISTConfig  # noqa: E402
from ist_accel.lifecycle import group_timeouts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("trainer", "deepspeed", "user"), required=True)
    ap.add_argument("--timeout", type=float, required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.mode == "trainer":
        import transformers

        from ist_accel.trainer import ISTTrainer

        targs = transformers.TrainingArguments(output_dir=args.out, use_cpu=True, report_to="none", max_steps=1)
        before = group_timeouts()  # TrainingArguments made the default group: its own timeout
        data = [{"input_ids": torch.zeros(8, dtype=torch.long), "labels": torch.zeros(8, dtype=torch.long)}] * 4
        ISTTrainer(model=make_model("gpt2"), args=targs, train_dataset=data,
                   ist_config=ISTConfig(num_subnets=2, local_steps=1, decomposition="layers", sync_timeout=args.timeout))
    elif args.mode == "deepspeed":
        from accelerate.utils import DeepSpeedPlugin

        before = []
        plugin = DeepSpeedPlugin(hf_ds_config={"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                                               "zero_optimization": {"stage": 2}})
        accelerator = ISTAccelerator(ISTConfig(num_subnets=2, local_steps=1, sync_timeout=args.timeout),
                                     deepspeed_plugin=plugin)
        assert accelerator.distributed_type.value == "DEEPSPEED", accelerator.distributed_type
    else:
        dist.init_process_group("gloo")
        before = group_timeouts()
        ISTAccelerator(ISTConfig(num_subnets=2, local_steps=1, sync_timeout=args.timeout), cpu=True)
    result = {"before": before, "after": group_timeouts(), "world": dist.get_world_size()}
    Path(args.out, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
