"""A plain multi-layer perceptron that flattens its input (so it accepts images)."""

from __future__ import annotations

from torch import nn

__all__ = ["MLP", "NORMS", "ACTIVATIONS"]

NORMS: tuple[str, ...] = ("batch", "layer")
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLP(nn.Sequential):
    """Flatten, then ``[Linear, norm?, activation, Dropout?]`` per hidden width, then a final Linear."""

    def __init__(
        self,
        in_features: int,
        hidden: list[int],
        out_features: int,
        norm: str | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        if norm is not None and norm not in NORMS:
            raise ValueError(f"norm must be None or one of {list(NORMS)}, got {norm!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if norm == "batch":
                layers.append(nn.BatchNorm1d(h))
            elif norm == "layer":
                layers.append(nn.LayerNorm(h))
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)
