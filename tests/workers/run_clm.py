"""transformers' ``examples/pytorch/language-modeling/run_clm.py`` flow, as users run it
(``torchrun``, every setting from the command line through ``HfArgumentParser``), with IST
added in one line: ``callbacks=[ISTCallback(...)]`` on the example's unmodified ``Trainer``.

Offline: the tokenizer is a word-level ``PreTrainedTokenizerFast`` built from the train
file, the model a small GPT-2 from its config (``AutoModelForCausalLM.from_config``); the
data go through ``datasets.load_dataset("text")``, tokenize, ``group_texts`` as in the
example. The script ends as the example does: metrics saved, state saved, model card.
The IST settings come from ``IST_*`` environment variables, so the command line is the
example's own.
"""

import math
import os
import sys
from dataclasses import dataclass, field
from itertools import chain

import torch
from datasets import load_dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, GPT2Config, HfArgumentParser, PreTrainedTokenizerFast, Trainer,
                          TrainingArguments, default_data_collator, set_seed)
from transformers.trainer_utils import get_last_checkpoint

from ist_accel import ISTCallback, ISTConfig


@dataclass
class ModelArguments:
    n_layer: int = field(default=4)
    n_embd: int = field(default=32)
    n_head: int = field(default=4)


@dataclass
class DataTrainingArguments:
    train_file: str = field(default=None)
    validation_file: str = field(default=None)
    block_size: int = field(default=16)


def word_tokenizer(train_file: str) -> PreTrainedTokenizerFast:
    words = sorted({w for line in open(train_file, encoding="utf-8") for w in line.split()})
    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="[EOS]", pad_token="[EOS]")


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    torch.set_num_threads(1)

    last_checkpoint = None  # the example's detection of an earlier run in output_dir
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
    set_seed(training_args.seed)

    raw = load_dataset("text", data_files={"train": data_args.train_file, "validation": data_args.validation_file})
    tokenizer = word_tokenizer(data_args.train_file)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_layer=model_args.n_layer,
                        n_embd=model_args.n_embd, n_head=model_args.n_head, bos_token_id=1, eos_token_id=1)
    model = AutoModelForCausalLM.from_config(config)

    def tokenize(examples):
        return tokenizer([t + " [EOS]" for t in examples["text"]])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = (len(concatenated["input_ids"]) // data_args.block_size) * data_args.block_size
        out = {k: [t[i : i + data_args.block_size] for i in range(0, total, data_args.block_size)]
               for k, t in concatenated.items()}
        out["labels"] = out["input_ids"].copy()
        return out

    with training_args.main_process_first(desc="dataset map"):
        tokenized = raw.map(tokenize, batched=True, remove_columns=["text"])
        lm = tokenized.map(group_texts, batched=True)

    ist_config = ISTConfig(num_subnets=int(os.environ.get("IST_NUM_SUBNETS", "2")),
                           local_steps=int(os.environ.get("IST_LOCAL_STEPS", "5")),
                           decomposition=os.environ.get("IST_DECOMPOSITION", "layers"), seed=3)
    trainer = Trainer(
        model=model, args=training_args,
        train_dataset=lm["train"] if training_args.do_train else None,
        eval_dataset=lm["validation"] if training_args.do_eval else None,
        processing_class=tokenizer, data_collator=default_data_collator,
        callbacks=[ISTCallback(ist_config)],  # the one line IST adds
    )

    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        metrics = train_result.metrics
        metrics["train_samples"] = len(lm["train"])
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(lm["validation"])
        metrics["perplexity"] = math.exp(metrics["eval_loss"])
        predicted = trainer.predict(lm["validation"])
        metrics["predict_loss"] = predicted.metrics["test_loss"]
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    # what a user reads off the model at the end (forwarded from the global model)
    facts = {"num_parameters": trainer.model.num_parameters(), "n_layer": trainer.model.config.n_layer,
             "trainer_class": type(trainer).__name__}
    trainer.save_metrics("model", facts)

    kwargs = {"finetuned_from": "gpt2-tiny", "tasks": "text-generation"}
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)
    trainer.accelerator.wait_for_everyone()
    sys.stdout.flush()
    os._exit(0)  # gloo's teardown can crash at exit (ENVIRONMENT.md); results are on disk


if __name__ == "__main__":
    main()
