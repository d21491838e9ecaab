"""A plain Seq2SeqTrainer with ISTCallback on a tiny T5 (layer-wise IST over encoder and decoder blocks): learn to
copy short token sequences; report the first logged loss, the final eval loss, and
predict() with generation (the global model's generate)."""

import argparse
import json
import os
import sys

import torch
import transformers

from ist_accel import ISTCallback, ISTConfig


def copy_task(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(2, 40, (n, 8), generator=g)
    return [{"input_ids": r, "labels": r.clone()} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        num_layers=4, num_decoder_layers=4, d_model=32, d_ff=64, num_heads=4, d_kv=8, vocab_size=40,
        decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0))
    training_args = transformers.Seq2SeqTrainingArguments(
        output_dir=args.out, per_device_train_batch_size=8, per_device_eval_batch_size=8, max_steps=50,
        learning_rate=3e-3, use_cpu=True, report_to="none", logging_steps=10, save_strategy="no", seed=0,
        disable_tqdm=True, predict_with_generate=True)
    config = ISTConfig(num_subnets=2, local_steps=10, decomposition="layers", stages="all")
    trainer = transformers.Seq2SeqTrainer(model=model, args=training_args, train_dataset=copy_task(800, 1),
                                          eval_dataset=copy_task(64, 2), callbacks=[ISTCallback(config)])
    trainer.train()
    metrics = trainer.evaluate()
    predicted = trainer.predict(copy_task(16, 3))  # model.generate: the global model's
    if trainer.args.process_index == 0:
        first = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump({"eval_loss": metrics["eval_loss"], "first_loss": first, "rounds": trainer.ist.round,
                       "trainer_class": type(trainer).__name__, "predictions_shape": list(predicted.predictions.shape),
                       "predict_loss": predicted.metrics["test_loss"]}, f)
    trainer.accelerator.wait_for_everyone()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
