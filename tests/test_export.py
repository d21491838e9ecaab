"""The exported global model is the evaluated one: ``Decomposition.export_state`` folds
the evaluation view's scaling into the weights, so the plain architecture loaded with the
export computes what ``eval_view`` computes, for every decomposition."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from common import make_model  # noqa: E402

from ist_accel import ISTConfig, decompose  # noqa: E402
from ist_accel.decompositions.scaling import fold_scalings  # noqa: E402


def _randomize(model: nn.Module) -> nn.Module:
    """Non-trivial values everywhere (BatchNorm statistics and affine parameters too)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g) * 0.2
                t.copy_(t.abs() + 0.5 + noise.abs() if name.endswith("running_var") else t + noise)
    return model


def _tiny(kind: str) -> nn.Module:
    import transformers

    if kind == "gpt2":
        return make_model("gpt2")
    config = transformers.LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=40, max_position_embeddings=16)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _inputs(model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if hasattr(model, "config"):
        return torch.randint(0, model.config.vocab_size, (2, 9), generator=g)
    if isinstance(model, nn.Sequential):
        return torch.randn(5, 12, generator=g)
    return torch.randn(3, 3, 16, 16, generator=g)


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = model(x, use_cache=False) if hasattr(model, "config") else model(x)
    return y.logits if hasattr(y, "logits") else y


CASES = [("resnet", dict(decomposition="resist", num_subnets=2)),
         ("resnet", dict(decomposition="resist", num_subnets=2, min_blocks=3, stages="all")),  # factor m/N = 3/4
         ("mlp", dict(decomposition="ist_mlp", num_subnets=2)),
         ("mlp", dict(decomposition="ist_mlp", num_subnets=4)),
         ("gpt2", dict(decomposition="layers", num_subnets=3)),
         ("gpt2", dict(decomposition="ffn", num_subnets=2)),
         ("gpt2", dict(decomposition="heads", num_subnets=2)),
         ("llama", dict(decomposition="heads", num_subnets=2)),
         ("llama", dict(decomposition="ffn", num_subnets=4))]


@pytest.mark.parametrize("name,settings", CASES, ids=[f"{n}-{s['decomposition']}-S{s['num_subnets']}"
                                                      + ("-m3" if s.get("min_blocks") else "") for n, s in CASES])
def test_folded_plain_model_equals_the_eval_view(name, settings):
    torch.manual_seed(0)
    model = _randomize(_tiny(name) if name in ("gpt2", "llama") else make_model(name))
    d = decompose(model, ISTConfig(**settings))
    assert d.eval_scalings(), "the case must scale something"
    x = _inputs(model)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with d.eval_view(model) as view, torch.no_grad():
        expected = _out(view, x)
    exported = d.export_state(model.state_dict())
    for key, value in model.state_dict().items():  # the raw training values are left as they were
        assert torch.equal(value, raw[key]), key
    plain = copy.deepcopy(model)
    plain.load_state_dict(exported)
    plain.eval()
    with torch.no_grad():
        got = _out(plain, x)
        unscaled = _out(model.eval(), x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unscaled, expected, atol=1e-4), "without folding the plain model would differ"


def test_without_eval_scaling_nothing_is_folded():
    model = make_model("mlp")
    d = decompose(model, ISTConfig(decomposition="ist_mlp", num_subnets=2, eval_scaling=False))
    exported = d.export_state(model.state_dict())
    assert all(torch.equal(exported[k], v) for k, v in model.state_dict().items())


def test_a_module_without_weights_to_fold_into_is_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, elementwise_affine=False), nn.ReLU())
    with pytest.raises(ValueError, match=r"'1'.*LayerNorm has no affine weight"):
        fold_scalings(model, model.state_dict(), [("1", 0.5, "out")])
    with pytest.raises(ValueError, match=r"cannot fold the evaluation scaling \(output x 0.5\) of '2'.*it is a ReLU"):
        fold_scalings(model, model.state_dict(), [("2", 0.5, "out")])
    with pytest.raises(ValueError, match=r"\(input x 0.5\) of '1'.*LayerNorm"):  # a norm is not linear in its input
        fold_scalings(model, model.state_dict(), [("1", 0.5, "in")])
