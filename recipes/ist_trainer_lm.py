#!/usr/bin/env python
"""Causal-LM training or fine-tuning with IST inside the Hugging Face Trainer.

Each of the S subnet groups trains part of the model between synchronizations:
``--decomposition layers`` (ResIST over the layer list, first and last layer shared),
``ffn`` (IST over every layer's FFN neurons) or ``heads`` (attention heads; grouped-query
attention keeps each key/value head with its query heads). Data: local text files
(``--train-file``/``--eval-file``) or a ``datasets`` text set (``--dataset``), grouped into
blocks of ``--block-size`` tokens. Model: a tiny config (``--model-config gpt2-tiny``,
``llama-tiny``; byte-level tokenizer, nothing downloaded) or ``--model-name-or-path``.
Reports perplexity of the global model on the eval text before and after training.

    torchrun --nproc_per_node 2 recipes/ist_trainer_lm.py --model-config gpt2-tiny --decomposition layers \\
        --train-file docs/benchmarks.md --eval-file docs/reliability.md --max-steps 100 --output-dir out_lm
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

from ist_accel import ISTConfig
from ist_accel.node_local import check_local_path, is_local_template, local_source, prepare_local_loader
from ist_accel.recipe import check_output_dir, finish, setup_logging

TINY = {
    "gpt2-tiny": lambda vocab, block: transformers.GPT2Config(
        n_layer=6, n_embd=128, n_head=4, vocab_size=vocab, n_positions=block, bos_token_id=1, eos_token_id=1),
    "llama-tiny": lambda vocab, block: transformers.LlamaConfig(
        num_hidden_layers=6, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab, max_position_embeddings=block, bos_token_id=1, eos_token_id=1, pad_token_id=0),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model and data")
    m.add_argument("--model-config", choices=sorted(TINY), default=None, help="a tiny model from its config")
    m.add_argument("--model-name-or-path", default=None, help="a pretrained model (hub name or folder)")
    m.add_argument("--train-file", default=None, help="a local text file; {rank}/{node} in it: each rank trains on "
                   "its own, not sharded again (node-local data, docs/recipes.md#node-local-data)")
    m.add_argument("--eval-file", default=None, help="a local text file (default: the train file's last 10%%); "
                   "{rank}/{node}: each rank scores its own, perplexity over all ranks' tokens")
    m.add_argument("--dataset", default=None, help="a `datasets` text set (hub name), with a 'text' column")
    m.add_argument("--dataset-config", default=None)
    m.add_argument("--block-size", type=int, default=128)
    i = p.add_argument_group("IST")
    i.add_argument("--decomposition", choices=("layers", "ffn", "heads"), default="layers")
    i.add_argument("--num-subnets", type=int, default=None, help="S (default: the number of processes / group size)")
    i.add_argument("--group-size", type=int, default=None, help="G (default: processes / S)")
    i.add_argument("--local-steps", type=int, default=10)
    i.add_argument("--min-blocks", type=int, default=0, help="layers: minimum layers per subnet")
    i.add_argument("--optimizer-state", choices=("reset", "carry"), default="carry")
    i.add_argument("--sync-timeout", type=float, default=600.0,
                   help="seconds a collective waits for a stalled peer before the run fails with ISTSyncError")
    i.add_argument("--outer-lr", type=float, default=1.0, help="outer SGD lr per round (1: plain averaging; DiLoCo 0.7)")
    i.add_argument("--outer-momentum", type=float, default=0.0, help="outer momentum (DiLoCo: 0.9)")
    i.add_argument("--outer-nesterov", action="store_true", help="Nesterov outer momentum (DiLoCo)")
    t = p.add_argument_group("training")
    t.add_argument("--max-steps", type=int, default=100)
    t.add_argument("--batch-size", type=int, default=8, help="per process")
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--lr-scheduler", default="cosine")
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--save-steps", type=int, default=0, help="checkpoint every this many steps (a multiple of --local-steps)")
    t.add_argument("--eval-steps", type=int, default=0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON (e.g. launch_configs/deepspeed_zero2.json): "
                   "ZeRO inside each subnet group")
    o = p.add_argument_group("output")
    o.add_argument("--output-dir", default="out_lm")
    o.add_argument("--report-to", choices=("wandb", "none"), default="none")
    o.add_argument("--resume", default=None, help="'auto' (latest checkpoint in --output-dir) or a checkpoint folder")
    args = p.parse_args(argv)
    check(args)
    return args


def check(args: argparse.Namespace) -> None:
    """Clear errors before any process group or file exists."""
    if (args.model_config is None) == (args.model_name_or_path is None):
        raise SystemExit("give exactly one of --model-config and --model-name-or-path")
    if (args.train_file is None) == (args.dataset is None):
        raise SystemExit("give exactly one of --train-file and --dataset")
    args.local_train = is_local_template(args.train_file)
    args.local_eval = is_local_template(args.eval_file) or (args.local_train and args.eval_file is None)
    for name in ("train_file", "eval_file"):
        if is_local_template(getattr(args, name)):
            try:
                source = local_source(getattr(args, name))
                check_local_path(source)
            except (ValueError, FileNotFoundError) as error:
                raise SystemExit(str(error)) from None
            setattr(args, name, source.path)
    for f in (args.train_file, args.eval_file):
        if f is not None and not Path(f).is_file():
            raise SystemExit(f"no such text file: {f}")
    for name in ("block_size", "local_steps", "max_steps", "batch_size", "grad_accum"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise SystemExit(f"--lr must be a finite number > 0, got {args.lr}")
    if not math.isfinite(args.sync_timeout) or args.sync_timeout <= 0:
        raise SystemExit(f"--sync-timeout must be a finite number of seconds > 0, got {args.sync_timeout}")
    check_output_dir(args.output_dir)
    if args.save_steps < 0 or args.save_steps % args.local_steps:
        raise SystemExit(f"--save-steps {args.save_steps} must be a multiple of --local-steps {args.local_steps}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.num_subnets is None:
        args.group_size = args.group_size or 1
        args.num_subnets = world // args.group_size
    elif args.group_size is None:
        args.group_size = max(1, world // args.num_subnets)
    try:
        config(args).check_world_size(world)
    except ValueError as error:
        raise SystemExit(f"bad IST setting: {error}") from None


def config(args: argparse.Namespace) -> ISTConfig:
    try:
        return ISTConfig(num_subnets=args.num_subnets, group_size=args.group_size, local_steps=args.local_steps,
                         min_blocks=args.min_blocks, decomposition=args.decomposition,
                         optimizer_state=args.optimizer_state, seed=args.seed, sync_timeout=args.sync_timeout,
                         outer_lr=args.outer_lr, outer_momentum=args.outer_momentum, outer_nesterov=args.outer_nesterov)
    except ValueError as error:
        raise SystemExit(f"bad IST setting: {error}") from None


def load_texts(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    if args.dataset:
        import datasets

        data = datasets.load_dataset(args.dataset, args.dataset_config)
        held = "validation" if "validation" in data else "test"
        return list(data["train"]["text"]), list(data[held]["text"])
    text = Path(args.train_file).read_text(encoding="utf-8")
    if args.eval_file:
        return [text], [Path(args.eval_file).read_text(encoding="utf-8")]
    cut = int(len(text) * 0.9)
    return [text[:cut]], [text[cut:]]


def blocks(tokenizer, texts: list[str], size: int) -> list[dict]:
    """Concatenate the tokenized texts and cut them into blocks (labels = inputs: causal LM)."""
    ids = [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    rows = torch.tensor(ids[: len(ids) // size * size], dtype=torch.long).view(-1, size)
    return [{"input_ids": r, "labels": r} for r in rows]


def perplexity(trainer: transformers.Trainer, dataset: list[dict], batch_size: int, local: bool = False) -> float:
    """exp(mean next-token loss) of the global model in its evaluation view, the eval
    blocks sharded over ranks (``local``: each rank's own blocks, every rank running as many
    batches as the largest set needs; a collective: every rank calls it)."""
    rank, world = (0, 1) if local else (trainer.args.process_index, trainer.args.world_size)
    batches = torch.tensor([-(-len(dataset[rank::world]) // batch_size)], device=trainer.args.device)
    if local and dist.is_initialized():
        dist.all_reduce(batches, dist.ReduceOp.MAX)
    model = trainer.model if trainer.ist is None else None
    totals = torch.zeros(2, dtype=torch.float64, device=trainer.args.device)
    context = trainer.global_model() if trainer.ist is not None else _eval_mode(model)
    with context as view, torch.no_grad():
        shard = dataset[rank::world]
        for start in range(0, len(shard), batch_size):
            x = torch.stack([b["input_ids"] for b in shard[start:start + batch_size]]).to(trainer.args.device)
            logits = view(x, use_cache=False).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1),
                                                    reduction="sum")
            totals += torch.tensor([float(nll), x[:, 1:].numel()], dtype=torch.float64, device=totals.device)
        for _ in range(int(batches) - -(-len(shard) // batch_size)):  # in step with the ranks that have more
            view(x, use_cache=False)
    if dist.is_initialized():
        dist.all_reduce(totals)
    return math.exp(float(totals[0] / totals[1]))


class LocalDataTrainer(transformers.Trainer):
    """A Trainer whose training blocks are this rank's own (node-local ``--train-file``): not
    sharded again across ranks; ``max_steps`` keeps every rank at the same steps."""

    def get_train_dataloader(self):
        loader = torch.utils.data.DataLoader(self.train_dataset, batch_size=self.args.per_device_train_batch_size,
                                             shuffle=True, drop_last=True, collate_fn=self.data_collator)
        return prepare_local_loader(self.accelerator, loader)


class _eval_mode:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was = self.model.training
        return self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was)


def main() -> None:
    setup_logging()
    args = parse_args()
    from ist_accel import ISTCallback  # here, not above: --help and bad arguments answer without the Trainer's import

    transformers.set_seed(args.seed)
    if args.model_config:
        tokenizer = transformers.ByT5Tokenizer(extra_ids=0)  # bytes: nothing to download
        model = transformers.AutoModelForCausalLM.from_config(TINY[args.model_config](len(tokenizer), args.block_size))
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_name_or_path)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
    train_texts, eval_texts = load_texts(args)
    train_set, eval_set = blocks(tokenizer, train_texts, args.block_size), blocks(tokenizer, eval_texts, args.block_size)
    if not train_set or not eval_set:
        raise SystemExit(f"not enough text for one block of {args.block_size} tokens (train {len(train_set)} blocks, "
                         f"eval {len(eval_set)})")
    training_args = transformers.TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps, learning_rate=args.lr, lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_steps, weight_decay=0.0, use_cpu=not torch.cuda.is_available(),
        report_to=args.report_to, logging_steps=args.local_steps, seed=args.seed,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        eval_strategy="steps" if args.eval_steps else "no", eval_steps=args.eval_steps or None,
        dataloader_drop_last=True, deepspeed=args.deepspeed)
    model_params = sum(p.numel() for p in model.parameters())
    trainer = (LocalDataTrainer if args.local_train else transformers.Trainer)(model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
                                   processing_class=tokenizer, callbacks=[ISTCallback(config(args))])  # IST: one line
    initial = perplexity(trainer, eval_set, args.batch_size, args.local_eval)
    resume = args.resume
    if resume == "auto":
        resume = transformers.trainer_utils.get_last_checkpoint(args.output_dir)
    trainer.train(resume_from_checkpoint=resume)
    final = perplexity(trainer, eval_set, args.batch_size, args.local_eval)
    trainer.save_model(os.path.join(args.output_dir, "model"))
    ist = trainer.ist
    values = torch.tensor([ist.totals.bytes_sent, ist.totals.bytes_received, ist.totals.bytes_lower,
                           ist.totals.compute_seconds, ist.totals.sync_seconds], dtype=torch.float64,
                          device=trainer.args.device)
    if dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    results = {"initial_perplexity": initial, "final_perplexity": final, "steps": trainer.state.global_step,
               "rounds": ist.round, "bytes_sent_per_worker": values[0].item(),
               "bytes_received_per_worker": values[1].item(), "bytes_lower_per_worker": values[2].item(),
               "compute_seconds": values[3].item(), "sync_seconds": values[4].item(),
               "subnet_params": ist.subnet_numel(), "model_params": model_params,
               "ist_config": ist.config.to_dict(), "split": "node-local" if args.local_train else "iid"}
    if args.local_train or args.local_eval:  # what each rank read, to check it read only its own
        records = [None] * max(trainer.args.world_size, 1)
        record = {"rank": trainer.args.process_index, "train_file": args.train_file, "eval_file": args.eval_file,
                  "train_blocks": len(train_set), "eval_blocks": len(eval_set)}
        dist.all_gather_object(records, record) if dist.is_initialized() else records.__setitem__(0, record)
        results["data_per_rank"] = records
    if trainer.args.process_index == 0:
        Path(args.output_dir, "results.json").write_text(json.dumps(results, indent=2))
        print(f"eval perplexity {initial:.2f} -> {final:.2f} after {results['steps']} steps, {results['rounds']} rounds")
    trainer.accelerator.wait_for_everyone()
    finish()


if __name__ == "__main__":
    main()
