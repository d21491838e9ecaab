"""Fixtures shared by the test modules."""

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ist_accel.data.images import extract_tarball


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
    files, about 20 s): the recipes' own tarball path finds it done. Removed after the session."""
    if not CIFAR_TAR.is_file():
        pytest.skip(f"real data missing: {CIFAR_TAR} (../shared absent)")
    cache = tmp_path_factory.mktemp("data_cache")
    extract_tarball(CIFAR_TAR, cache / CIFAR_TAR.name.split(".")[0])  # where the recipes look
    yield cache
    shutil.rmtree(cache, ignore_errors=True)
