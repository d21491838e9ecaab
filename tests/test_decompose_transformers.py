"""Layer-wise decomposition of `transformers` models built from configs (no downloads):
the layer lists and their residual branches are found from structure and config, a subnet
is the global model with the layers it does not hold skipped, it costs its share of the
FLOPs, and the evaluation view scales exactly the partitioned layers' branches."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

transformers = pytest.importorskip("transformers")

from ist_accel import ISTConfig, decompose  # noqa: E402
from ist_accel.decompose import TransformerLayerDecomposition, find_layer_stacks, load_subnet, state_tensors  # noqa: E402


def tiny(name: str) -> nn.Module:
    torch.manual_seed(0)
    t = transformers
    if name == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(n_layer=6, n_embd=32, n_head=4, vocab_size=97, n_positions=32,
                                              bos_token_id=0, eos_token_id=0))
    if name == "bert":
        return t.BertForMaskedLM(t.BertConfig(num_hidden_layers=6, hidden_size=32, intermediate_size=64,
                                              num_attention_heads=4, vocab_size=97))
    if name == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(num_hidden_layers=6, hidden_size=32, intermediate_size=64,
                                                num_attention_heads=4, num_key_value_heads=2, vocab_size=97))
    if name == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(num_hidden_layers=6, hidden_size=32, intermediate_size=64,
                                                num_attention_heads=4, num_key_value_heads=2, vocab_size=97))
    if name == "t5":
        return t.T5ForConditionalGeneration(t.T5Config(num_layers=5, num_decoder_layers=5, d_model=32, d_ff=64,
                                                       num_heads=4, d_kv=8, vocab_size=97))
    raise ValueError(name)


STACKS = {
    "gpt2": [("transformer.h", 6, "attn.c_proj,mlp.c_proj")],
    "bert": [("bert.encoder.layer", 6, "attention.output.dense,output.dense")],
    "llama": [("model.layers", 6, "self_attn.o_proj,mlp.down_proj")],
    "qwen2": [("model.layers", 6, "self_attn.o_proj,mlp.down_proj")],
    "t5": [("encoder.block", 5, "layer.0.SelfAttention.o,layer.1.DenseReluDense.wo"),
           ("decoder.block", 5, "layer.0.SelfAttention.o,layer.1.EncDecAttention.o,layer.2.DenseReluDense.wo")],
}
INPUT = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model, x=INPUT):
    kwargs = {"decoder_input_ids": x} if isinstance(model, transformers.T5ForConditionalGeneration) else {}
    with torch.no_grad():
        return model(x, use_cache=False, **kwargs).logits


def skip_unheld(model, d, assignment, s):
    """The global model with only the layers subnet ``s`` holds (shared ones included)."""
    reference = copy.deepcopy(model)
    for st in d.stages:
        layers = reference.get_submodule(st.path)
        held = {st.start + u for u in assignment.units[s][st.path]}
        keep = [layer for i, layer in enumerate(layers) if not st.start <= i < st.stop or i in held]
        parent, _, leaf = st.path.rpartition(".")
        setattr(reference.get_submodule(parent) if parent else reference, leaf, nn.ModuleList(keep))
    return reference


@pytest.mark.parametrize("name", sorted(STACKS))
def test_layer_lists_found_and_subnet_is_the_model_without_unheld_layers(name):
    model = tiny(name).eval()
    assert [(s.path, s.stop, s.branch) for s in find_layer_stacks(model)] == STACKS[name]
    d = decompose(model, ISTConfig(num_subnets=2, stages="all", seed=3))
    assert isinstance(d, TransformerLayerDecomposition)  # "auto" picks layers for transformers
    assert [(st.path, st.start, st.stop) for st in d.stages] == [(p, 1, n - 1) for p, n, _ in STACKS[name]]
    for r in range(2):
        a = d.assignment(r)
        for s in range(2):
            sub = d.build_subnet(s).eval()
            load_subnet(sub, state_tensors(model), d.pieces(a, s))
            expected = logits(skip_unheld(model, d, a, s))
            torch.testing.assert_close(logits(sub), expected, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(expected, logits(model), atol=1e-3)  # skipping layers changes the output
            assert sub.config.use_cache is False and model.config.use_cache is not False


@pytest.mark.parametrize("name,S", [("gpt2", 2), ("llama", 2), ("llama", 4), ("bert", 2)])
def test_subnet_flops_are_the_model_minus_its_unheld_layers(name, S):
    model = tiny(name).eval()
    d = decompose(model, ISTConfig(num_subnets=S))
    (st,) = d.stages
    a = d.assignment(0)

    def flops(m):
        with FlopCounterMode(display=False) as counter:
            logits(m)
        return counter.get_total_flops(), counter.get_flop_counts()

    total, per_module = flops(model)
    layer = per_module[f"{type(model).__name__}.{st.path}.1"]
    layer_flops = sum(layer.values())
    sub = d.build_subnet(0).eval()
    load_subnet(sub, state_tensors(model), d.pieces(a, 0))
    unheld = st.num_blocks - len(a.units[0][st.path])
    measured, _ = flops(sub)
    assert measured == pytest.approx(total - unheld * layer_flops, rel=0.05)
    assert measured < total


def test_eval_view_scales_the_branches_of_partitioned_layers_only():
    model = tiny("llama").eval()
    d = decompose(model, ISTConfig(num_subnets=4, min_blocks=1))  # 4 partitioned layers: scale max(1/4, 1/4)
    plain = logits(model)
    handles = []
    for i in range(1, 5):
        for branch in ("self_attn.o_proj", "mlp.down_proj"):
            handles.append(model.get_submodule(f"model.layers.{i}.{branch}").register_forward_hook(
                lambda m, inp, out: out * 0.25))
    by_hand = logits(model)
    for h in handles:
        h.remove()
    with d.eval_view(model) as view:
        scaled = logits(view)
    torch.testing.assert_close(scaled, by_hand)
    assert not torch.allclose(scaled, plain, atol=1e-4)
    torch.testing.assert_close(logits(model), plain)  # hooks gone


def test_explicit_layer_ranges_and_clear_errors():
    model = tiny("gpt2")
    d = decompose(model, ISTConfig(num_subnets=3, stages="transformer.h:0-5", decomposition="layers"))
    assert [(st.start, st.stop) for st in d.stages] == [(0, 6)]
    with pytest.raises(ValueError, match=r"layer lists are \['transformer.h:0-5'\]"):
        decompose(model, ISTConfig(num_subnets=2, stages="model.layers", decomposition="layers"))
    with pytest.raises(ValueError, match="layers of 'transformer.h' are 0-5"):
        decompose(model, ISTConfig(num_subnets=2, stages="transformer.h:2-9", decomposition="layers"))
    with pytest.raises(ValueError, match="num_subnets=5 exceeds the 4 partitionable blocks"):
        decompose(model, ISTConfig(num_subnets=5))
    with pytest.raises(ValueError, match="is not a transformers model"):
        decompose(nn.Sequential(nn.Linear(4, 4)), ISTConfig(num_subnets=2, decomposition="layers"))
