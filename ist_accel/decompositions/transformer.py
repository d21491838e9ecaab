"""Layer-wise decomposition of transformers (ResIST, arXiv 2107.00961, applied to the
layer list of a `transformers` model: GPT-2, BERT/RoBERTa, Llama/Mistral/Qwen2, T5, ViT).

The layer lists are found from the model's structure and config: a ``ModuleList`` of
identical layers whose length is one of the config's layer counts
(``num_hidden_layers``, ``n_layer``, ``num_layers``, ``num_decoder_layers``). By default
the first and last layer of each list are shared by every subnet and the middle ones are
dealt round-robin, as ResIST deals residual blocks; a subnet skips the layers it does not
hold. Each layer's residual branches end in an output projection (``o_proj``,
``out_proj``, ``c_proj``, ``down_proj``, ``fc2``, ``o``/``wo``, or ``dense`` under an
``output`` module); the evaluation view scales them by ``max(1/S, m/N)``.
"""

from __future__ import annotations

from torch import nn

from .residual import ResidualDecomposition
from .residual_stages import STAGE_SPEC, ResidualStage

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers")
OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "c_proj", "down_proj", "fc2", "o", "wo", "dense_4h_to_h")


def is_transformer(model: nn.Module) -> bool:
    """A `transformers` model: it has a config with a layer count."""
    config = getattr(model, "config", None)
    return config is not None and any(isinstance(getattr(config, k, None), int) for k in LAYER_COUNT_KEYS)


def _layer_counts(config: object) -> set[int]:
    counts = {getattr(config, k, None) for k in LAYER_COUNT_KEYS}
    for sub in ("text_config", "encoder", "decoder"):  # composite configs
        if hasattr(config, sub) and not isinstance(getattr(config, sub), (int, str)):
            counts |= _layer_counts(getattr(config, sub))
    return {c for c in counts if isinstance(c, int) and c >= 2}


def _branches(layer: nn.Module) -> list[str]:
    """Block-relative names of the layer's residual-branch output projections."""
    found = []
    for name, module in layer.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if not name or list(module.children()):
            continue
        if leaf in OUTPUT_PROJECTIONS or (leaf == "dense" and parent.endswith("output")):
            found.append(name)
    return found


def find_layer_stacks(model: nn.Module) -> list[ResidualStage]:
    """Every layer list of a `transformers` model, as whole stages ``[0, N)``."""
    if not is_transformer(model):
        raise ValueError(f"{type(model).__name__} is not a transformers model (no config with a layer count)")
    counts = _layer_counts(model.config)
    stacks = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) not in counts:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        branches = _branches(module[0])
        if not branches:
            continue
        stacks.append(ResidualStage(path, 0, len(module), ",".join(branches)))
    if not stacks:
        raise ValueError(
            f"no layer list found in {type(model).__name__}: expected an nn.ModuleList of identical layers of "
            f"length {sorted(counts)} whose layers end their residual branches in one of {OUTPUT_PROJECTIONS}")
    return stacks


def select_layer_stages(stacks: list[ResidualStage], stages: str) -> list[ResidualStage]:
    """``longest`` / ``all``: the middle layers (first and last shared) of the longest /
    every list; or explicit ``path:first-last`` ranges (any layers, e.g. ``model.layers:0-31``)."""
    def middle(s: ResidualStage) -> ResidualStage:
        return ResidualStage(s.path, 1, s.stop - 1, s.branch)

    usable = [middle(s) for s in stacks if s.stop - 1 > 1]
    if stages in ("longest", "all"):
        if not usable:
            raise ValueError(f"layer lists {[s.path for s in stacks]} are too short to keep a first and last layer "
                             "shared; give layers explicitly, e.g. stages='<path>:0-<N-1>'")
        if stages == "all":
            return usable
        longest = max(s.num_blocks for s in usable)
        return [[s for s in usable if s.num_blocks == longest][-1]]
    chosen = []
    for spec in (p.strip() for p in stages.split(",") if p.strip()):
        m = STAGE_SPEC.match(spec)
        stack = next((s for s in stacks if m and s.path == m["path"]), None)
        if stack is None:
            raise ValueError(f"bad stage {spec!r}: layer lists are {[f'{s.path}:0-{s.stop - 1}' for s in stacks]}")
        a = int(m["a"]) if m["a"] is not None else 1
        b = int(m["b"]) if m["b"] is not None else (stack.stop - 2 if m["a"] is None else a)
        if not 0 <= a <= b < stack.stop:
            raise ValueError(f"bad stage {spec!r}: layers of {stack.path!r} are 0-{stack.stop - 1}")
        chosen.append(ResidualStage(stack.path, a, b + 1, stack.branch))
    if len({s.path for s in chosen}) != len(chosen):
        raise ValueError(f"layer list given twice in {stages!r}")
    return chosen


class TransformerLayerDecomposition(ResidualDecomposition):
    """ResIST over a transformer's layers (``decomposition="layers"``): each subnet holds
    the shared layers and ``max(floor(N/S), m)`` of the partitioned ones, in order."""

    def __init__(
        self,
        model: nn.Module,
        num_subnets: int,
        *,
        min_blocks: int = 0,
        stages: str = "longest",
        seed: int = 0,
        eval_scaling: bool = True,
    ) -> None:
        super().__init__(model, num_subnets, min_blocks=min_blocks,
                         stages=select_layer_stages(find_layer_stacks(model), stages), seed=seed,
                         eval_scaling=eval_scaling)

    def build_subnet(self, subnet: int) -> nn.Module:
        sub = super().build_subnet(subnet)
        # a subnet's layers are slots refilled each round: no KV cache across them
        if hasattr(sub, "config"):  # the copy's own config (its modules share it)
            sub.config.use_cache = False
        for st in self.stages:
            for slot, layer in enumerate(sub.get_submodule(st.path)):
                for module in layer.modules():
                    if isinstance(getattr(module, "layer_idx", None), int):
                        module.layer_idx = slot
        return sub


__all__ = ["TransformerLayerDecomposition", "find_layer_stacks", "is_transformer", "select_layer_stages"]
