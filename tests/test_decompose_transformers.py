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
from ist_accel.decompositions import TransformerLayerDecomposition, find_layer_stacks, load_subnet, state_tensors  # noqa: E402


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
    if name == "vit":
        return t.ViTForImageClassification(t.ViTConfig(num_hidden_layers=6, hidden_size=32, intermediate_size=64,
                                                       num_attention_heads=4, image_size=16, patch_size=4, num_labels=3))
    if name == "t5":
        return t.T5ForConditionalGeneration(t.T5Config(num_layers=5, num_decoder_layers=5, d_model=32, d_ff=64,
                                                       num_heads=4, d_kv=8, vocab_size=97))
    raise ValueError(name)


STACKS = {
    "gpt2": [("transformer.h", 6, "attn.c_proj,mlp.c_proj")],
    "bert": [("bert.encoder.layer", 6, "attention.output.dense,output.dense")],
    "llama": [("model.layers", 6, "self_attn.o_proj,mlp.down_proj")],
    "qwen2": [("model.layers", 6, "self_attn.o_proj,mlp.down_proj")],
    "vit": [("vit.layers", 6, "attention.o_proj,mlp.fc2")],
    "t5": [("encoder.block", 5, "layer.0.SelfAttention.o,layer.1.DenseReluDense.wo"),
           ("decoder.block", 5, "layer.0.SelfAttention.o,layer.1.EncDecAttention.o,layer.2.DenseReluDense.wo")],
}
INPUT = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def logits(model, x=INPUT):
    with torch.no_grad():
        if isinstance(model, transformers.ViTForImageClassification):
            return model(PIXELS).logits
        kwargs = {"decoder_input_ids": x} if isinstance(model, transformers.T5ForConditionalGeneration) else {}
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
            if name != "vit":  # (no KV cache in an image encoder)
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


# ---- width-wise: FFN neurons and attention heads ------------------------------------------------------------

WIDTH_OUT = {  # per family: (FFN output projection, attention output projection, layer list)
    "gpt2": ("mlp.c_proj", "attn.c_proj", "transformer.h"),
    "bert": ("output.dense", "attention.output.dense", "bert.encoder.layer"),
    "llama": ("mlp.down_proj", "self_attn.o_proj", "model.layers"),
    "qwen2": ("mlp.down_proj", "self_attn.o_proj", "model.layers"),
    "vit": ("mlp.fc2", "attention.o_proj", "vit.layers"),
}


def zero_unheld(model, d, units, held):
    """The global model with the neurons / heads a subnet does not hold silenced: their
    columns of the output projection zeroed (the other parts of the layer are unchanged)."""
    reference = copy.deepcopy(model)
    ffn_out, attn_out, stack = WIDTH_OUT[name_of(model)]
    head_dim = d.head_dim
    with torch.no_grad():
        for i in range(len(reference.get_submodule(stack))):
            out = reference.get_submodule(f"{stack}.{i}.{ffn_out if units == 'ffn' else attn_out}")
            width = out.weight.shape[0] if type(out).__name__ == "Conv1D" else out.weight.shape[1]
            keep = torch.zeros(width, dtype=torch.bool)
            kept = held[f"{stack}.{i}.{units}"]
            if units == "ffn":
                keep[list(kept)] = True
            else:
                group = d.num_heads // d.num_kv_heads
                for kv in kept:
                    keep[kv * group * head_dim:(kv + 1) * group * head_dim] = True
            if type(out).__name__ == "Conv1D":
                out.weight[~keep] = 0
            else:
                out.weight[:, ~keep] = 0
    return reference


def name_of(model):
    return {"GPT2LMHeadModel": "gpt2", "BertForMaskedLM": "bert", "LlamaForCausalLM": "llama",
            "Qwen2ForCausalLM": "qwen2", "ViTForImageClassification": "vit"}[type(model).__name__]


@pytest.mark.parametrize("name", sorted(WIDTH_OUT))
@pytest.mark.parametrize("units", ["ffn", "heads"])
def test_width_subnet_is_the_model_with_unheld_neurons_or_heads_silenced(name, units):
    model = tiny(name).eval()
    d = decompose(model, ISTConfig(num_subnets=2, decomposition=units, seed=4))
    a = d.assignment(1)
    assert sorted(a.units[0][next(iter(d.groups))] + a.units[1][next(iter(d.groups))]) == list(
        range(d.groups[next(iter(d.groups))]))  # disjoint and complete
    for s in range(2):
        sub = d.build_subnet(s).eval()
        load_subnet(sub, state_tensors(model), d.pieces(a, s))
        torch.testing.assert_close(logits(sub), logits(zero_unheld(model, d, units, a.units[s])), rtol=1e-5,
                                   atol=1e-5)
    share = sum(p.numel() for p in sub.parameters()) / sum(p.numel() for p in model.parameters())
    assert share < 0.95


def test_grouped_query_attention_keeps_query_groups_with_their_kv_heads():
    model = tiny("llama").eval()  # 4 query heads, 2 key/value heads: groups of 2
    d = decompose(model, ISTConfig(num_subnets=2, decomposition="heads"))
    sub = d.build_subnet(0)
    attention = sub.model.layers[0].self_attn
    assert (attention.q_proj.out_features, attention.k_proj.out_features, attention.o_proj.in_features) == (16, 8, 16)
    with pytest.raises(ValueError, match="number of key/value heads 2 is not divisible by num_subnets=4"):
        decompose(model, ISTConfig(num_subnets=4, decomposition="heads"))
    with pytest.raises(ValueError, match="FFN width 64 is not divisible by num_subnets=3"):
        decompose(model, ISTConfig(num_subnets=3, decomposition="ffn"))


@pytest.mark.parametrize("units", ["ffn", "heads"])
def test_width_subnet_flops_shrink_the_cut_branch(units):
    model = tiny("llama").eval()
    d = decompose(model, ISTConfig(num_subnets=2, decomposition=units))
    sub = d.build_subnet(0).eval()
    load_subnet(sub, state_tensors(model), d.pieces(d.assignment(0), 0))

    def flops(m):
        with FlopCounterMode(display=False) as counter:
            logits(m)
        return counter.get_total_flops(), counter.get_flop_counts()

    total, per_module = flops(model)
    branch = "mlp" if units == "ffn" else "self_attn"
    cut = sum(sum(per_module[f"LlamaForCausalLM.model.layers.{i}.{branch}"].values()) for i in range(6))
    measured, _ = flops(sub)
    assert measured == pytest.approx(total - cut / 2, rel=0.05)


def test_width_eval_view_scales_cut_output_projections_by_one_over_s():
    model = tiny("gpt2").eval()
    d = decompose(model, ISTConfig(num_subnets=2, decomposition="ffn"))
    handles = [model.get_submodule(f"transformer.h.{i}.mlp.c_proj").register_forward_pre_hook(
        lambda m, inp: (inp[0] * 0.5,)) for i in range(6)]
    by_hand = logits(model)
    for h in handles:
        h.remove()
    with d.eval_view(model) as view:
        torch.testing.assert_close(logits(view), by_hand)
