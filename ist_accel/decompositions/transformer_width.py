"""Width-wise decomposition of transformers (IST, arXiv 1910.02120, applied inside each
layer): every round each layer's FFN neurons (``decomposition="ffn"``) or attention heads
(``"heads"``) are shuffled and split into S disjoint equal parts. Subnet s holds, per
layer, the rows of its neurons in the projections into the FFN (``up``/``gate``) and their
columns in the projection out (``down``); or its heads' rows of q/k/v and columns of the
output projection. With grouped-query attention the units are the key/value heads, each
with its group of query heads, so every subnet keeps the model's grouping. Everything else
is shared. The evaluation view scales the inputs of the cut output projections by ``1/S``
(each subnet learned a branch's output from ``1/S`` of its neurons or heads).

Supported layer layouts (module names inside a layer): Llama-family (``mlp.gate_proj``/
``up_proj``/``down_proj``, ``self_attn.q_proj``/``k_proj``/``v_proj``/``o_proj``), GPT-2
(``mlp.c_fc``/``c_proj``, fused ``attn.c_attn``, ``attn.c_proj``), BERT/RoBERTa
(``intermediate.dense``/``output.dense``, ``attention.self.query``/``key``/``value``,
``attention.output.dense``), ViT (``mlp.fc1``/``fc2``, ``attention.q_proj`` ... ``o_proj``)
and OPT-style layers (``fc1``/``fc2``, ``self_attn.*_proj``/``out_proj``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..tensors import Piece
from .base import Assignment, Decomposition, check_num_subnets
from .sampling import split_assignment
from .scaling import Scaling
from .trace import get_module, set_module
from .transformer import find_layer_stacks

FFN_LAYOUTS = ((("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"), (("mlp.c_fc",), "mlp.c_proj"),
               (("intermediate.dense",), "output.dense"), (("mlp.fc1",), "mlp.fc2"), (("fc1",), "fc2"))
ATTENTION_LAYOUTS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
                     ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
                     ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"),
                     ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"))
FUSED_ATTENTION_LAYOUTS = (("attn.c_attn", "attn.c_proj"),)


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a Linear with its weight stored as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _out_features(module: nn.Module) -> int:
    return module.nf if _is_conv1d(module) else module.out_features


def _weight_index(module: nn.Module, out: torch.Tensor | None, inp: torch.Tensor | None) -> tuple:
    return (inp, out) if _is_conv1d(module) else (out, inp)


def _shrunk(module: nn.Module, out: int | None = None, inp: int | None = None) -> nn.Module:
    w = module.weight
    if _is_conv1d(module):
        new = type(module)(out or module.nf, inp or w.shape[0])
        return new.to(dtype=w.dtype, device=w.device)
    return nn.Linear(inp or module.in_features, out or module.out_features, bias=module.bias is not None,
                     dtype=w.dtype, device=w.device)


@dataclass(frozen=True)
class _Layer:
    path: str
    ffn_in: tuple[str, ...] = ()
    ffn_out: str = ""
    qkv: tuple[str, ...] = ()   # separate q, k, v projections, or one fused projection
    attn_out: str = ""


class TransformerWidthDecomposition(Decomposition):
    """IST over FFN neurons (``units="ffn"``) or attention heads (``units="heads"``) of
    every layer of a `transformers` model."""

    def __init__(self, model: nn.Module, num_subnets: int, units: str, *, seed: int = 0,
                 eval_scaling: bool = True) -> None:
        check_num_subnets(num_subnets)
        if units not in ("ffn", "heads"):
            raise ValueError(f"units must be 'ffn' or 'heads', got {units!r}")
        self.model, self.num_subnets, self.units, self.seed, self.eval_scaling = model, num_subnets, units, seed, eval_scaling
        config = model.config
        self.num_heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
        self.head_dim = getattr(config, "head_dim", None) or hidden // self.num_heads
        self.layers = [self._layout(f"{st.path}.{i}") for st in find_layer_stacks(model) for i in range(st.stop)]
        self.widths = {}
        for layer in self.layers:
            if units == "ffn":
                self.widths[f"{layer.path}.ffn"] = _out_features(get_module(model, f"{layer.path}.{layer.ffn_in[0]}"))
            else:
                self.widths[f"{layer.path}.heads"] = self.num_kv_heads
        for group, width in self.widths.items():
            if width % num_subnets:
                what = "FFN width" if units == "ffn" else "number of key/value heads"
                ok = [d for d in range(1, min(width, 64) + 1) if width % d == 0]
                raise ValueError(f"{group}: {what} {width} is not divisible by num_subnets={num_subnets}; "
                                 f"use num_subnets in {ok}")

    def _layout(self, path: str) -> _Layer:
        layer = get_module(self.model, path)
        names = {n for n, _ in layer.named_modules()}
        if self.units == "ffn":
            for ins, out in FFN_LAYOUTS:
                if all(n in names for n in (*ins, out)):
                    return _Layer(path, ffn_in=ins, ffn_out=out)
            raise ValueError(f"{path}: no supported FFN layout (expected one of {FFN_LAYOUTS})")
        for q, k, v, o in ATTENTION_LAYOUTS:
            if all(n in names for n in (q, k, v, o)):
                return _Layer(path, qkv=(q, k, v), attn_out=o)
        for fused, o in FUSED_ATTENTION_LAYOUTS:
            if fused in names and o in names:
                return _Layer(path, qkv=(fused,), attn_out=o)
        raise ValueError(f"{path}: no supported attention layout (expected one of {ATTENTION_LAYOUTS} "
                         f"or {FUSED_ATTENTION_LAYOUTS})")

    # ---- Decomposition API --------------------------------------------------

    @property
    def groups(self) -> dict[str, int]:
        return dict(self.widths)

    def draw(self, round_: int) -> Assignment:
        return split_assignment(self.widths, self.num_subnets, self.seed, round_)

    def _head_dims(self, kv_heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(query dims, key/value dims) of the given key/value heads and their query groups."""
        group, d = self.num_heads // self.num_kv_heads, self.head_dim
        q_heads = (kv_heads[:, None] * group + torch.arange(group)).flatten()
        return (q_heads[:, None] * d + torch.arange(d)).flatten(), (kv_heads[:, None] * d + torch.arange(d)).flatten()

    def _cuts(self, units: dict[str, tuple[int, ...]]) -> dict[str, tuple]:
        """Global tensor name -> index of the part held with these units."""
        cuts: dict[str, tuple] = {}
        for layer in self.layers:
            p = layer.path
            if self.units == "ffn":
                idx = torch.tensor(units[f"{p}.ffn"], dtype=torch.long)
                for name in layer.ffn_in:
                    m = get_module(self.model, f"{p}.{name}")
                    cuts[f"{p}.{name}.weight"] = _weight_index(m, idx, None)
                    cuts[f"{p}.{name}.bias"] = (idx,)
                m = get_module(self.model, f"{p}.{layer.ffn_out}")
                cuts[f"{p}.{layer.ffn_out}.weight"] = _weight_index(m, None, idx)
                continue
            q_dims, kv_dims = self._head_dims(torch.tensor(units[f"{p}.heads"], dtype=torch.long))
            if len(layer.qkv) == 1:  # fused q|k|v columns (GPT-2)
                width = self.num_heads * self.head_dim
                dims = torch.cat([q_dims, kv_dims + width, kv_dims + 2 * width])
                m = get_module(self.model, f"{p}.{layer.qkv[0]}")
                cuts[f"{p}.{layer.qkv[0]}.weight"] = _weight_index(m, dims, None)
                cuts[f"{p}.{layer.qkv[0]}.bias"] = (dims,)
            else:
                for name, dims in zip(layer.qkv, (q_dims, kv_dims, kv_dims)):
                    m = get_module(self.model, f"{p}.{name}")
                    cuts[f"{p}.{name}.weight"] = _weight_index(m, dims, None)
                    cuts[f"{p}.{name}.bias"] = (dims,)
            m = get_module(self.model, f"{p}.{layer.attn_out}")
            cuts[f"{p}.{layer.attn_out}.weight"] = _weight_index(m, None, q_dims)
        return cuts

    def pieces(self, assignment: Assignment, subnet: int) -> list[Piece]:
        cuts = self._cuts(assignment.units[subnet])
        return [Piece(name, name, cuts.get(name)) for name in self.tensor_names]

    def build_subnet(self, subnet: int) -> nn.Module:
        S = self.num_subnets
        sub = copy.deepcopy(self.model)
        for layer in self.layers:
            p = layer.path
            if self.units == "ffn":
                for name in layer.ffn_in:
                    old = get_module(self.model, f"{p}.{name}")
                    set_module(sub, f"{p}.{name}", _shrunk(old, out=_out_features(old) // S))
                old = get_module(self.model, f"{p}.{layer.ffn_out}")
                inp = old.weight.shape[0] if _is_conv1d(old) else old.in_features
                set_module(sub, f"{p}.{layer.ffn_out}", _shrunk(old, inp=inp // S))
                continue
            for name in layer.qkv:
                old = get_module(self.model, f"{p}.{name}")
                set_module(sub, f"{p}.{name}", _shrunk(old, out=_out_features(old) // S))
            old = get_module(self.model, f"{p}.{layer.attn_out}")
            inp = old.weight.shape[0] if _is_conv1d(old) else old.in_features
            set_module(sub, f"{p}.{layer.attn_out}", _shrunk(old, inp=inp // S))
            attention = get_module(sub, f"{p}.{layer.qkv[0]}".rsplit(".", 1)[0])
            width = self.num_heads // S * self.head_dim
            patches = {"num_heads": self.num_heads // S, "num_attention_heads": self.num_heads // S,
                       "num_key_value_heads": self.num_kv_heads // S, "all_head_size": width, "split_size": width}
            for attr, value in patches.items():  # attributes the forward reads (it splits by them)
                if isinstance(getattr(attention, attr, None), int):
                    setattr(attention, attr, value)
        return sub

    def shared_names(self) -> set[str]:
        cut = self._cuts(self.assignment(0).units[0])
        return {n for n in self.tensor_names if n not in cut}

    def eval_scalings(self) -> list[Scaling]:
        """Inputs of every layer's cut output projection (FFN down / attention out) by ``1/S``."""
        if not self.eval_scaling or self.num_subnets == 1:
            return []
        outs = [f"{layer.path}.{layer.ffn_out if self.units == 'ffn' else layer.attn_out}" for layer in self.layers]
        return [(name, 1.0 / self.num_subnets, "in") for name in outs]


__all__ = ["TransformerWidthDecomposition"]
