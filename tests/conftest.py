"""Fixtures shared by the test modules."""

import pytest


@pytest.fixture(scope="session")
def deepspeed_cpu_comm_op() -> None:
    """DeepSpeed JIT-compiles its CPU shared-memory comm op at the first ``initialize``;
    build it once per session here (cached under TORCH_EXTENSIONS_DIR) rather than in
    several racing worker processes, which on 2 cores took minutes."""
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    ShareMemCommBuilder().load()
