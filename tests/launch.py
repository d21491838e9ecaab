"""Launch multi-process CPU runs from tests (gloo), robust to gloo's crash at exit:
workers end with ``os._exit(0)`` after writing their results, and success is judged by
the results each rank wrote, not only by torchrun's exit code."""

import os
import socket
import subprocess
import sys
from pathlib import Path

WORKERS = Path(__file__).parent / "workers"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, nproc: int, args: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "--master_addr=127.0.0.1", str(WORKERS / script), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    return proc


ROOT = Path(__file__).resolve().parent.parent
CPU_CONFIG = ROOT / "launch_configs" / "cpu.yaml"


def accelerate_launch(script: str | Path, nproc: int, args: list[str], timeout: float = 900,
                      env: dict | None = None, config: Path = CPU_CONFIG) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file launch_configs/cpu.yaml`` (or ``config``) with N processes,
    as a user runs it."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--num_processes", str(nproc), "--main_process_port", str(free_port()), str(script), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
