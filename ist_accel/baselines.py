"""torchft's DiLoCo (Douillard et al., arXiv 2311.08105) as a baseline of the recipes'
training loop (``--method diloco``), beside DDP and Accelerate's ``LocalSGD``.

Every rank is one torchft replica group of one process: its own store, a torchft ``Manager``
with a gloo process group, all joined through one lighthouse that rank 0 serves. Each rank
advertises the address its peers reach it at (the source address of its route to the main
node), not its hostname or ``localhost``, so the replicas find each other across hosts. The model is
Accelerate's DDP-wrapped one with gradient sync off (as ``LocalSGD`` does); torchft's
``DiLoCo`` wraps it and, every ``sync_every`` inner optimizer steps, all-reduces the
pseudo-gradient and applies the outer optimizer (SGD, Nesterov momentum). Its bytes are
modeled as the ring all-reduce of the parameters per sync, as for LocalSGD: torchft's
process group does not go through ``torch.distributed``'s functions that the wiretap counts.
"""

from __future__ import annotations

import datetime
import importlib.util
import logging
import os
import socket
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


class TorchftDiLoCo:
    """A context like Accelerate's ``LocalSGD``: enter it around the training loop; the
    syncs happen inside the inner optimizer's ``step`` (torchft's hook)."""

    def __init__(self, accelerator: Any, model: nn.Module, optimizer: torch.optim.Optimizer, sync_every: int,
                 outer_lr: float = 0.7, outer_momentum: float = 0.9, outer_nesterov: bool = True,
                 timeout: float = 600.0) -> None:
        if importlib.util.find_spec("torchft") is None:
            raise SystemExit("--method diloco needs torchft: pip install torchft (0.2)")
        self.accelerator, self.model, self.sync_every = accelerator, model, sync_every
        self.inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper: torchft hooks the real one
        self.outer_args = dict(lr=outer_lr, momentum=outer_momentum, nesterov=outer_nesterov)
        self.timeout = datetime.timedelta(seconds=timeout)
        self.final_partial_sync = False  # set when the end of training cut a round short

    def __enter__(self) -> "TorchftDiLoCo":
        from torchft import Manager, ProcessGroupGloo
        from torchft.coordination import LighthouseServer
        from torchft.local_sgd import DiLoCo

        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        self._no_sync = self.model.no_sync() if hasattr(self.model, "no_sync") else None
        if self._no_sync is not None:
            self._no_sync.__enter__()
        here = own_address()
        self.lighthouse = LighthouseServer(bind="0.0.0.0:0", min_replicas=world) if rank == 0 else None
        # torchft names the lighthouse by this host's name, which other hosts may not resolve
        address = [f"http://{here}:{self.lighthouse.address().rsplit(':', 1)[1]}" if self.lighthouse else None]
        dist.broadcast_object_list(address, src=0)
        self.store = dist.TCPStore(here, _free_port(), 1, is_master=True, wait_for_workers=False)
        self.manager = Manager(pg=ProcessGroupGloo(timeout=self.timeout), load_state_dict=self._load,
                               state_dict=self._state, min_replica_size=world, use_async_quorum=False,
                               replica_id=f"replica_{rank}", store_addr=here, store_port=self.store.port, hostname=here,
                               checkpoint_transport=_reachable_transport(here, self.timeout),
                               rank=0, world_size=1, lighthouse_addr=address[0], timeout=self.timeout,
                               quorum_timeout=self.timeout, connect_timeout=self.timeout)
        module = getattr(self.model, "module", self.model)
        outer = torch.optim.SGD(module.parameters(), **self.outer_args)
        self.diloco = DiLoCo(self.manager, [module], self.inner, outer, sync_every=self.sync_every,
                             backup_device=torch.device("cpu"), pin_memory=False)
        self.diloco.__enter__()
        return self

    def step(self) -> None:
        """For the loop's ``local_sgd.step()``: DiLoCo counts the inner optimizer's steps itself."""

    def _state(self) -> dict[str, Any]:
        module = getattr(self.model, "module", self.model)
        return {"model": module.state_dict(), "inner": self.inner.state_dict()}

    def _load(self, state: dict[str, Any]) -> None:
        module = getattr(self.model, "module", self.model)
        module.load_state_dict(state["model"])
        self.inner.load_state_dict(state["inner"])

    def __exit__(self, *exc: Any) -> None:
        try:
            if exc[0] is None:
                self._finish_round()
            self.diloco.__exit__(*exc)
        finally:
            self.manager.shutdown(wait=False)
            if self.lighthouse is not None:
                self.lighthouse.shutdown()
            if self._no_sync is not None:
                self._no_sync.__exit__(*exc)


    def _finish_round(self) -> None:
        """End as one model in every rank, the one rank 0 saves. (1) The outer step over a round
        the end of training cut short, as Accelerate's ``LocalSGD`` averages once more when its
        context exits: torchft's ``DiLoCo.__exit__`` only removes its hooks, so a budget that is
        not a multiple of ``sync_every`` left each rank with its own local model, each scored on
        its shard of the test set. This replays torchft 0.2's post-step hook for the partial
        round (fragment_sync_delay 0). (2) DiLoCo syncs parameters only: the BatchNorm
        statistics stay each rank's own, so every rank takes rank 0's (as DDP broadcasts them)."""
        diloco = self.diloco
        if diloco._local_step:
            self.manager.start_quorum()
            fragment = diloco._fragments[diloco._current_fragment()]
            fragment.prepare_sync()
            fragment.perform_sync()
            diloco._local_step = 0
            self.final_partial_sync = True
        for buffer in getattr(self.model, "module", self.model).buffers():
            dist.broadcast(buffer.data, src=0)


def _reachable_transport(here: str, timeout: datetime.timedelta) -> Any:
    """torchft's HTTP checkpoint transport (how a joining replica fetches the model), advertised
    at ``here`` instead of this host's name."""
    from torchft.checkpointing.http_transport import HTTPTransport

    class ReachableHTTPTransport(HTTPTransport):
        def address(self) -> str:
            return super().address().replace(f"//{socket.gethostname()}:", f"//{here}:", 1)

    return ReachableHTTPTransport(timeout=timeout, num_chunks=0)


def own_address() -> str:
    """This host's address as its peers reach it: the source address of its route to the main
    node (``MASTER_ADDR``; 127.0.0.1 when every rank is on this host)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(os.environ.get("MASTER_ADDR", "127.0.0.1")), 9))  # sends nothing
        return s.getsockname()[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
