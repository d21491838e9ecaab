"""Models and deterministic batches shared by workers and the single-process reference."""

import torch
from torch import nn

from ist_accel.models import MLP, build_model


def make_model(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The test model ``name`` in ``dtype`` (float64 where fp32 rounding would be amplified:
    the same initial values, rounded from the same fp32 draws)."""
    torch.manual_seed(1234)
    return _make_model(name).to(dtype)


def _make_model(name: str) -> nn.Module:
    if name == "resnet":
        return build_model("preact_resnet32", num_classes=4)  # layer3: 4 partitionable blocks, BatchNorm
    if name == "mlp":
        return MLP(12, [16, 16], 3, norm="batch")
    if name == "gpt2":  # a tiny GPT-2 from its config, no dropout (deterministic)
        import transformers

        config = transformers.GPT2Config(n_layer=5, n_embd=16, n_head=2, vocab_size=31, n_positions=16,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                         eos_token_id=0)
        return transformers.GPT2LMHeadModel(config)
    raise ValueError(name)


def batch_for(name: str, subnet: int, replica: int, step: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1000 * subnet + 100 * replica + step)
    if name == "resnet":
        return torch.randn(4, 3, 16, 16, generator=g).to(dtype), torch.randint(0, 4, (4,), generator=g)
    if name == "gpt2":
        tokens = torch.randint(0, 31, (4, 10), generator=g)
        return tokens, tokens
    return torch.randn(6, 12, generator=g).to(dtype), torch.randint(0, 3, (6,), generator=g)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    if hasattr(model, "config"):  # a causal LM: next-token loss
        return model(batch[0], labels=batch[1], use_cache=False).loss
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def score(model: nn.Module, batch) -> tuple[float, int]:
    """(correct, count): top-1 accuracy, next-token accuracy for a causal LM."""
    x, y = batch
    if hasattr(model, "config"):
        predicted = model(x, use_cache=False).logits[:, :-1].argmax(-1)
        return float((predicted == y[:, 1:]).sum()), y[:, 1:].numel()
    return float((model(x).argmax(-1) == y).sum()), len(y)


def eval_items(name: str, dtype: torch.dtype = torch.float32) -> list:
    """A small deterministic evaluation set of (input, label) items."""
    g = torch.Generator().manual_seed(99)
    if name == "gpt2":
        xs = torch.randint(0, 31, (20, 10), generator=g)
        return list(zip(xs, xs))
    if name == "resnet":
        xs, ys = torch.randn(24, 3, 16, 16, generator=g), torch.randint(0, 4, (24,), generator=g)
    else:
        xs, ys = torch.randn(50, 12, generator=g), torch.randint(0, 3, (50,), generator=g)
    return list(zip(xs.to(dtype), ys))


class WireCount:
    """The test's own count of the bytes this rank sends and receives through
    ``torch.distributed``, written apart from the engine (``ist_accel.transport``'s ledger)
    and from ``ist_accel.wiretap``, to check the figures they report.

    Point-to-point messages are counted exactly (their payload). A collective's bytes per
    rank depend on its algorithm; we take the ones gloo runs: ring all-reduce, 2 (N-1)/N of
    the tensor each way; all-gather, N-1 chunks each way; reduce-scatter and all-to-all,
    (N-1)/N of the input; broadcast, the root sends the tensor to each of N-1 ranks, each
    receives it once; reduce, the reverse. ``isend``/``irecv`` stay unwrapped (``P2POp``
    takes only the originals); the engine batches them, counted in ``batch_isend_irecv``.
    """

    NAMES = ("send", "recv", "batch_isend_irecv", "all_reduce", "reduce", "broadcast", "all_gather",
             "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single")

    def __init__(self) -> None:
        self.sent = {"p2p": 0.0, "collective": 0.0}
        self.received = {"p2p": 0.0, "collective": 0.0}
        self.calls: dict[str, int] = {}
        self._originals: dict = {}

    def install(self) -> "WireCount":
        import torch.distributed as dist

        for name in self.NAMES:
            original = getattr(dist, name)
            self._originals[name] = original
            setattr(dist, name, self._wrapped(name, original))
        return self

    def uninstall(self) -> None:
        import torch.distributed as dist

        for name, original in self._originals.items():
            setattr(dist, name, original)

    def total_sent(self) -> float:
        return self.sent["p2p"] + self.sent["collective"]

    def _wrapped(self, name, original):
        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            getattr(self, f"_{name}")(*args, **kwargs)
            return original(*args, **kwargs)

        return counted

    def _add(self, kind: str, sent: float, received: float) -> None:
        self.sent[kind] += sent
        self.received[kind] += received

    @staticmethod
    def _bytes(t) -> int:
        return t.numel() * t.element_size()

    @staticmethod
    def _ranks(group) -> int:
        import torch.distributed as dist

        return dist.get_world_size(group)

    @staticmethod
    def _me() -> int:
        import torch.distributed as dist

        return dist.get_rank()

    def _send(self, tensor, *args, **kwargs):
        self._add("p2p", self._bytes(tensor), 0)

    def _recv(self, tensor, *args, **kwargs):
        self._add("p2p", 0, self._bytes(tensor))

    def _batch_isend_irecv(self, ops):
        for op in ops:
            if op.op.__name__ == "isend":
                self._add("p2p", self._bytes(op.tensor), 0)
            else:
                self._add("p2p", 0, self._bytes(op.tensor))

    def _all_reduce(self, tensor, op=None, group=None, async_op=False):
        n = self._ranks(group)
        each_way = 2 * (n - 1) * self._bytes(tensor) / n
        self._add("collective", each_way, each_way)

    def _rooted(self, tensor, root, group, root_sends):
        n = self._ranks(group)
        fan_out = (n - 1) * self._bytes(tensor)  # the root's side
        if self._me() == root:
            self._add("collective", fan_out if root_sends else 0, 0 if root_sends else fan_out)
        else:
            self._add("collective", 0 if root_sends else self._bytes(tensor), self._bytes(tensor) if root_sends else 0)

    def _broadcast(self, tensor, src=None, group=None, async_op=False, group_src=None):
        assert group_src is None, "count by global rank only"
        self._rooted(tensor, src, group, root_sends=True)

    def _reduce(self, tensor, dst=None, op=None, group=None, async_op=False, group_dst=None):
        assert group_dst is None, "count by global rank only"
        self._rooted(tensor, dst, group, root_sends=False)

    def _all_gather(self, tensor_list, tensor, group=None, async_op=False):
        chunks = (self._ranks(group) - 1) * self._bytes(tensor)
        self._add("collective", chunks, chunks)

    def _all_gather_into_tensor(self, output, input, group=None, async_op=False):
        self._all_gather(None, input, group)

    def _reduce_scatter_tensor(self, output, input, op=None, group=None, async_op=False):
        n = self._ranks(group)
        share = (n - 1) * self._bytes(input) / n
        self._add("collective", share, share)

    def _all_to_all_single(self, output, input, *args, group=None, **kwargs):
        n = self._ranks(group)
        self._add("collective", (n - 1) * self._bytes(input) / n, (n - 1) * self._bytes(output) / n)
