"""The quantized wire in :class:`~ist_accel.reference.ReferenceIST`: what a round's
averaged values become on their way to the next round's places, derived from the two
assignments alone (no transfer plan), tensor by tensor (:mod:`ist_accel.wire_codec`):

* an element of a cut tensor travels when its place changes (a group's subnet, or the
  owner group of its row while nobody holds it); the elements of one tensor going from
  group ``s`` to group ``d``, in the tensor's row-major order, are cut into blocks;
* a whole tensor held by one group that keeps it alone stays exact; otherwise every next
  holder takes the mean, in holder order, of every holder's decoded value;
* the shared set (whole in every group, both rounds, and not riding in the messages):
  each group's value rounded, the sum in group order divided by S, rounded again;
* frozen tensors, float buffers (BatchNorm's running statistics) and scalar optimizer state
  travel exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .tensors import Piece
from .transfer import owner_group, shared_rides_messages
from .wire_codec import WireCodec, noise, stream_id


class ReferenceWire:
    """Applies the quantized wire of one round transition to global tensors."""

    def __init__(self, codec: WireCodec, num_subnets: int) -> None:
        self.codec, self.S = codec, num_subnets

    def _roundtrip(self, flat: torch.Tensor, index: torch.Tensor, round_: int, *stream) -> torch.Tensor:
        u = noise(self.codec.seed, round_, stream_id(*stream), index, flat.dtype)
        return self.codec.roundtrip(flat, torch.arange(index.numel()) // self.codec.block, u)

    def apply(self, round_: int, fields: Sequence[tuple[str, str, bool]], tensors: Mapping[str, torch.Tensor],
              now: Sequence[list[Piece]], following: Sequence[list[Piece]],
              contributions: Mapping[str, dict[int, torch.Tensor]], total_numel: int) -> None:
        """``fields``: (field name, tensor name its pieces follow, how it travels: "coded",
        "exact" (buffers, scalar state) or "frozen") in the engine's naming;
        ``tensors[field]`` its averaged global value (rewritten in place); ``now[s]`` /
        ``following[s]`` the subnets' pieces in the two rounds; ``contributions[field][s]``
        subnet ``s``'s value of a whole tensor it held; ``total_numel`` every field's size."""
        held_now, held_next = _by_tensor(now), _by_tensor(following)
        shared = [f for f, param, how in fields if how != "frozen" and self._is_shared(held_now[param], held_next[param])]
        rides = shared_rides_messages(self.S, sum(tensors[f].numel() for f in shared), total_numel)
        for name, param, how in fields:
            if how != "coded" or tensors[name].dim() == 0:
                continue
            P, Pn = held_now[param], held_next[param]
            target = tensors[name]
            if all(_whole(p) for p in P.values()):
                values = contributions[name]
                if name in shared and not rides:
                    target.copy_(self._shared_mean(round_, name, [values[s] for s in range(self.S)]))
                elif not (len(P) == 1 and sorted(Pn) == sorted(P)):
                    acc = None
                    for h in sorted(P):
                        flat = values[h].reshape(-1).to(target.dtype)
                        part = self._roundtrip(flat, torch.arange(flat.numel()), round_, name, h)
                        acc = part if acc is None else acc + part
                    target.copy_((acc / len(P)).view(target.shape))
                continue
            src, dst = _places(target, P, self.S), _places(target, Pn, self.S)
            flat = target.view(-1)
            for s in range(self.S):
                for d in range(self.S):
                    if s != d:
                        sel = torch.nonzero(((src == s) & (dst == d)).reshape(-1)).reshape(-1)
                        if sel.numel():
                            flat[sel] = self._roundtrip(flat[sel], sel, round_, name, s)

    def _is_shared(self, P: Mapping[int, Piece], Pn: Mapping[int, Piece]) -> bool:
        whole = all(_whole(p) for p in (*P.values(), *Pn.values()))
        return whole and len(P) == len(Pn) == self.S

    def _shared_mean(self, round_: int, name: str, values: list[torch.Tensor]) -> torch.Tensor:
        index = torch.arange(values[0].numel())
        acc = None
        for s, v in enumerate(values):
            part = self._roundtrip(v.reshape(-1), index, round_, name, "shared", 1, s)
            acc = part if acc is None else acc + part
        mean = acc / self.S
        return self._roundtrip(mean, index, round_, name, "shared", 2).view(values[0].shape)


def _whole(piece: Piece) -> bool:
    return piece.index is None or all(i is None for i in piece.index)


def _by_tensor(pieces: Sequence[list[Piece]]) -> dict[str, dict[int, Piece]]:
    out: dict[str, dict[int, Piece]] = {}
    for s, group in enumerate(pieces):
        for piece in group:
            out.setdefault(piece.global_name, {})[s] = piece
    return out


def _places(target: torch.Tensor, pieces: Mapping[int, Piece], S: int) -> torch.Tensor:
    """Each element's group: its holder, else its row's owner."""
    holder = torch.full(target.shape, -1, dtype=torch.int64)
    for s, piece in pieces.items():
        holder.index_put_(piece.grid(holder), torch.tensor(s))
    rows = torch.arange(target.shape[0]).view(-1, *([1] * (target.dim() - 1)))
    return torch.where(holder >= 0, holder, owner_group(rows, target.shape[0], S))


__all__ = ["ReferenceWire"]
