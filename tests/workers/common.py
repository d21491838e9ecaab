"""Models and deterministic batches shared by workers and the single-process reference."""

import torch
from torch import nn

from ist_accel.models import MLP, build_model


def make_model(name: str) -> nn.Module:
    torch.manual_seed(1234)
    if name == "resnet":
        return build_model("preact_resnet32", num_classes=4)  # layer3: 4 partitionable blocks, BatchNorm
    if name == "mlp":
        return MLP(12, [16, 16], 3, norm="batch")
    if name == "gpt2":  # a tiny GPT-2 from its config, no dropout (deterministic)
        import transformers

        config = transformers.GPT2Config(n_layer=5, n_embd=16, n_head=2, vocab_size=31, n_positions=16,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                         eos_token_id=0)
        return transformers.GPT2LMHeadModel(config)
    raise ValueError(name)


def batch_for(name: str, subnet: int, replica: int, step: int):
    g = torch.Generator().manual_seed(1000 * subnet + 100 * replica + step)
    if name == "resnet":
        return torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 4, (4,), generator=g)
    if name == "gpt2":
        tokens = torch.randint(0, 31, (4, 10), generator=g)
        return tokens, tokens
    return torch.randn(6, 12, generator=g), torch.randint(0, 3, (6,), generator=g)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    if hasattr(model, "config"):  # a causal LM: next-token loss
        return model(batch[0], labels=batch[1], use_cache=False).loss
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def score(model: nn.Module, batch) -> tuple[float, int]:
    """(correct, count): top-1 accuracy, next-token accuracy for a causal LM."""
    x, y = batch
    if hasattr(model, "config"):
        predicted = model(x, use_cache=False).logits[:, :-1].argmax(-1)
        return float((predicted == y[:, 1:]).sum()), y[:, 1:].numel()
    return float((model(x).argmax(-1) == y).sum()), len(y)


def eval_items(name: str) -> list:
    """A small deterministic evaluation set of (input, label) items."""
    g = torch.Generator().manual_seed(99)
    if name == "gpt2":
        xs = torch.randint(0, 31, (20, 10), generator=g)
        return list(zip(xs, xs))
    if name == "resnet":
        xs, ys = torch.randn(24, 3, 16, 16, generator=g), torch.randint(0, 4, (24,), generator=g)
    else:
        xs, ys = torch.randn(50, 12, generator=g), torch.randint(0, 3, (50,), generator=g)
    return list(zip(xs, ys))
