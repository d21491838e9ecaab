"""Data that stays where it is: every rank reads only what its node holds (IST's
"mandatory distribution", Yuan et al., arXiv 1910.02120, Sec. 1: data "unavoidably
separated among workers", "no requirements for sharing data between workers").

A path template names each rank's data with placeholders, expanded from the launcher's
environment (torchrun's, which ``accelerate launch`` uses too):

* ``{rank}``: the global process rank (``RANK``), one folder per worker;
* ``{node}``: the machine rank (``GROUP_RANK``, i.e. ``--machine_rank`` / ``--node_rank``),
  one folder per machine;
* ``{local_rank}``: the process's rank on its machine (``LOCAL_RANK``).

Ranks whose templates expand to the same path share that folder and split it among
themselves only (never across folders); with ``{node}`` these are the processes of one
machine (ranks are numbered machine by machine, ``LOCAL_WORLD_SIZE`` per machine).

:func:`local_source` runs before any process group exists (it reads only the environment)
and :func:`check_local_path` names the rank, the node and the expanded placeholders when a
folder is missing. :func:`prepare_local_loader` is the ``ISTAccelerator`` / ``Accelerator``
user's seam: a DataLoader prepared for this rank (device placement, seedable sampler,
``set_epoch``) that is sharded only among the ranks sharing its folder, in place of passing
it to ``prepare`` (which would shard it over every rank).
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PLACEHOLDERS", "LocalSource", "check_local_path", "expand", "is_local_template", "local_source",
           "prepare_local_loader"]

PLACEHOLDERS = ("rank", "node", "local_rank")


def is_local_template(template: str | os.PathLike | None) -> bool:
    """Whether ``template`` names node-local data (holds ``{rank}``, ``{node}`` or ``{local_rank}``)."""
    return template is not None and bool(re.search(r"\{(%s)\}" % "|".join(PLACEHOLDERS), str(template)))


def expand(template: str, rank: int, node: int, local_rank: int) -> str:
    """``template`` with its placeholders filled in; a ``ValueError`` for an unknown one."""
    names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    unknown = sorted(names - set(PLACEHOLDERS))
    if unknown:
        raise ValueError(f"{template}: unknown placeholder(s) {', '.join('{%s}' % u for u in unknown)}; "
                         f"use {', '.join('{%s}' % p for p in PLACEHOLDERS)}")
    return template.format(rank=rank, node=node, local_rank=local_rank)


@dataclass(frozen=True)
class LocalSource:
    """This rank's node-local data: the template, where it expanded to, and the ranks that
    share that path (this rank reads the items ``share_index, share_index + share_count, ...``)."""

    template: str
    path: str
    rank: int
    node: int
    local_rank: int
    share_index: int
    share_count: int

    @property
    def expanded(self) -> dict[str, int]:
        """The placeholders the template used, with this rank's values."""
        values = {"rank": self.rank, "node": self.node, "local_rank": self.local_rank}
        return {p: values[p] for p in PLACEHOLDERS if "{%s}" % p in self.template}

    def describe(self) -> str:
        filled = ", ".join(f"{{{k}}}={v}" for k, v in self.expanded.items())
        return f"rank {self.rank} (node {self.node}): {self.template} with {filled} -> {self.path}"


def local_source(template: str, env: Mapping[str, str] | None = None) -> LocalSource:
    """This rank's :class:`LocalSource` from the launcher's environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``); no process group."""
    env = os.environ if env is None else env
    rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    per_node = int(env.get("LOCAL_WORLD_SIZE", world))
    local_rank = int(env.get("LOCAL_RANK", rank % per_node))
    node = int(env.get("GROUP_RANK", rank // per_node))
    paths = [expand(template, r, r // per_node, r % per_node) for r in range(world)]
    paths[rank] = expand(template, rank, node, local_rank)
    sharers = [r for r in range(world) if paths[r] == paths[rank]]
    return LocalSource(template, paths[rank], rank, node, local_rank, sharers.index(rank), len(sharers))


def check_local_path(source: LocalSource) -> None:
    """A ``FileNotFoundError`` naming the rank, the node, the expanded placeholders and the
    path, when this rank's folder (or file) is missing."""
    if not Path(source.path).exists():
        raise FileNotFoundError(f"node-local data missing on {source.describe()}: no such file or folder")


def prepare_local_loader(accelerator: Any, dataloader: Any, share_index: int = 0, share_count: int = 1) -> Any:
    """``dataloader`` prepared for this rank only: batches on ``accelerator.device``, the
    seedable sampler Accelerate uses (``set_epoch``, ``skip_first_batches`` and resumes work
    as for a prepared loader), sharded among ``share_count`` ranks sharing the folder (this
    rank is ``share_index``; :class:`LocalSource` has both), never over the whole world.

    Use it instead of passing a node-local loader to ``prepare``::

        src = local_source("/data/site{node}")
        train_dl = prepare_local_loader(accelerator, DataLoader(load(src.path), batch_size=64, shuffle=True),
                                        src.share_index, src.share_count)
    """
    from accelerate.data_loader import prepare_data_loader

    config = getattr(accelerator, "dataloader_config", None)
    return prepare_data_loader(dataloader, accelerator.device, num_processes=share_count, process_index=share_index,
                               put_on_device=True, use_seedable_sampler=True,
                               data_seed=getattr(config, "data_seed", None))
