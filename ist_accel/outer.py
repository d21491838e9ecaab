"""The outer optimizer of a round: DiLoCo's outer step (Douillard et al., arXiv 2311.08105,
Alg. 1) applied to IST's units.

A round changes an element held by k holders by its pseudo-gradient
``g = before - mean_i(after_i)``, fed to SGD with momentum (PyTorch's convention, dampening 0):
``m' = mu m + g``, then ``x' = before - lr m'``, or with Nesterov ``x' = before - lr (g + mu m')``.
``lr = 1, mu = 0`` is plain averaging, the papers' IST (``x' = mean_i after_i``).

Every holder of an element starts the round from the same ``before`` and ``m``, and ``x'`` and
``m'`` are affine in the ``after_i`` with weights that sum to one. So each holder turns its own
values into its contribution,

    w_i = mu m + (before - after_i)
    z_i = before - lr (w_i + mu (before - after_i) + mu^2 m)   if Nesterov   (= before - lr ((1+mu) d + mu^2 m))
    z_i = before - lr w_i                                       otherwise

and the exchange's plain average over holders yields ``x'`` and ``m'`` exactly: no extra round
trip, only the momentum travelling with its unit (one more field per trained parameter, as
optimizer state does under ``carry``). Elements nobody held keep value and momentum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MOMENTUM_KEY = "outer_momentum"  # the travelling field of a parameter: "<name>:outer_momentum"


@dataclass(frozen=True)
class OuterSGD:
    """SGD (optionally Nesterov) momentum over a round's pseudo-gradient."""

    lr: float = 1.0
    momentum: float = 0.0
    nesterov: bool = False

    @property
    def is_plain_average(self) -> bool:
        """``lr = 1, momentum = 0``: today's averaging, left bit-identical (no transform at all)."""
        return self.lr == 1.0 and self.momentum == 0.0

    @property
    def has_momentum(self) -> bool:
        return self.momentum != 0.0

    def contribute(self, after: torch.Tensor, before: torch.Tensor, momentum: torch.Tensor | None) -> torch.Tensor | None:
        """Turn this holder's ``after`` (in place) into its value contribution ``z``; return its
        momentum contribution ``w`` (None without momentum)."""
        mu, lr = self.momentum, self.lr
        with torch.no_grad():
            delta = before - after  # this holder's pseudo-gradient
            if not self.has_momentum:
                after.copy_(before).sub_(delta, alpha=lr)
                return None
            w = delta.add(momentum, alpha=mu)
            step = delta.add(w, alpha=mu) if self.nesterov else w
            after.copy_(before).sub_(step, alpha=lr)
            return w
