"""The engine from a model no rank builds whole (2 gloo ranks, plain IST, one launch):
a meta-device MLP and pre-act ResNet, a GPT-2 from_config under init_empty_weights, and a meta MLP started from a safetensors file,
train 3 rounds of 2 steps; each is evaluated streamed (no rank holds the global model),
its global state gathered to rank 0, and saved sharded. Each rank writes what it saw to
``<case>_rank<r>.json``; rank 0 saves ``<case>_global.pt``."""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from common import batch_for, eval_items, loss_fn, score  # noqa: E402

from ist_accel import IST, ISTConfig  # noqa: E402
from ist_accel.init import SafetensorsValues  # noqa: E402
from ist_accel.models import MLP, build_model  # noqa: E402
from ist_accel.sharded import save_sharded  # noqa: E402


def meta_model(name: str) -> torch.nn.Module:
    if name == "gpt2":  # as a transformers user does: from_config under Accelerate's init_empty_weights
        import transformers
        from accelerate import init_empty_weights

        config = transformers.GPT2Config(n_layer=5, n_embd=16, n_head=2, vocab_size=31, n_positions=16,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        with init_empty_weights():
            return transformers.AutoModelForCausalLM.from_config(config)
    with torch.device("meta"):
        if name == "resnet":
            return build_model("preact_resnet32", num_classes=4)
        return MLP(12, [16, 16], 3, norm="batch")


def run(case: str, name: str, out: Path, initial: str | None) -> None:
    model = meta_model(name)
    config = ISTConfig(num_subnets=2, local_steps=2, seed=5, decomposition="layers" if name == "gpt2" else "auto")
    values = SafetensorsValues(initial) if initial else None
    ist = IST(model, lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), config, initial_values=values)
    for t in range(6):
        loss_fn(ist.model, batch_for(name, ist.group_index, 0, t)).backward()
        ist.optimizer.step()
        ist.optimizer.zero_grad(set_to_none=True)
    accuracy = ist.evaluate(eval_items(name), batch_size=7, score=score)
    state = ist.gather_state(dst=0)
    save_sharded(ist, out / f"{case}_model")
    seen = {
        "accuracy": accuracy, "streams": ist.streams, "rounds": ist.round,
        "global_still_meta": all(t.is_meta for t in (*model.parameters(), *model.buffers())),
        "resident_bytes": ist.resident_bytes(),
        "subnet_numel": ist.subnet_numel(), "global_numel": sum(p.numel() for p in model.parameters()),
        "refused_gather": None,
    }
    try:
        ist.gather_global()
    except RuntimeError as error:
        seen["refused_gather"] = str(error)
    if dist.get_rank() == 0:
        torch.save(state, out / f"{case}_global.pt")
    (out / f"{case}_rank{dist.get_rank()}.json").write_text(json.dumps(seen))
    ist.remove_hooks()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--initial", required=True, help="a safetensors file of the MLP's initial values")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out = Path(args.out)
    run("mlp", "mlp", out, None)
    run("resnet", "resnet", out, None)
    run("mlp_file", "mlp", out, args.initial)
    run("gpt2", "gpt2", out, None)
    dist.barrier()
    os._exit(0)  # the gloo crash at exit (ENVIRONMENT.md)


if __name__ == "__main__":
    main()
