"""Fixtures shared by the test modules."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ist_accel.data.images import extract_tarball


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n 2``) each worker computes on one thread, as the ranks it launches
    do (OMP_NUM_THREADS=1): torch's default of one thread per core put 2 in-process threads
    beside the other worker's ranks, and the oversubscribed test took 142 s instead of 39."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``long`` (15-120 s alone) run first: under ``-n 2`` (pytest-xdist) each worker
    starts on them and the short ones fill in at the end, so neither worker is left running a
    long test alone (one at the end of the order kept one core idle for 2 minutes)."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable: collection order otherwise


@pytest.fixture(scope="session")
def deepspeed_cpu_comm_op() -> None:
    """DeepSpeed JIT-compiles its CPU shared-memory comm op at the first ``initialize``;
    build it once per session here (cached under TORCH_EXTENSIONS_DIR) rather than in
    several racing worker processes, which on 2 cores took minutes."""
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    ShareMemCommBuilder().load()


CIFAR_TAR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def cifar_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A ``--data-cache`` folder where the CIFAR-10 JPEG tarball is already extracted (60k
    files): the recipes' own tarball path finds it done. In RAM (/dev/shm) where it has room:
    on this machine's disk the extraction took 12-99 s and its removal 2-27 s, in RAM 8 s and
    0.5 s. Removed after the session."""
    if not CIFAR_TAR.is_file():
        pytest.skip(f"real data missing: {CIFAR_TAR} (../shared absent)")
    ram = _ram_folder()
    cache = Path(tempfile.mkdtemp(prefix="ist-data-cache-", dir=ram)) if ram else tmp_path_factory.mktemp("data_cache")
    try:
        extract_tarball(CIFAR_TAR, cache / CIFAR_TAR.name.split(".")[0])  # where the recipes look
        yield cache
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _ram_folder(room: int = 2 << 30) -> str | None:
    """/dev/shm when it is a writable tmpfs with ``room`` bytes free (Docker's default is 64 MiB)."""
    shm = "/dev/shm"
    if not (os.path.isdir(shm) and os.access(shm, os.W_OK)):
        return None
    stats = os.statvfs(shm)
    return shm if stats.f_bavail * stats.f_frsize >= room else None
