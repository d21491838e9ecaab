"""Launch multi-process CPU runs from tests (gloo), robust to gloo's crash at exit:
workers end with ``os._exit(0)`` after writing their results, and success is judged by
the results each rank wrote, not only by torchrun's exit code."""

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from zygote import FIXED_ENV

WORKERS = Path(__file__).parent / "workers"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str | Path, nproc: int, args: list[str], timeout: float = 300, env: dict | None = None,
             real: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``tests/workers/<script>`` (or the script at an absolute path) on ``nproc`` gloo
    ranks. The ranks are forked from the warm zygote (``tests/zygote.py``) with torchrun's
    environment; ``real=True``, an ``env`` that sets what the zygote has fixed, or
    ``IST_TEST_LAUNCHER=torchrun`` use torchrun itself."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    if _use_zygote(real, env):
        return _Zygote.get().run("torchrun", WORKERS / script, nproc, args, env or {}, timeout, cwd)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "--master_addr=127.0.0.1", str(WORKERS / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)


def _use_zygote(real: bool, env: dict | None) -> bool:
    """Fork from the zygote unless asked not to, or unless ``env`` changes what it fixed at import."""
    return (not real and os.environ.get("IST_TEST_LAUNCHER", "zygote") == "zygote"
            and all(FIXED_ENV.get(key, value) == value for key, value in (env or {}).items()))


class _Zygote:
    """The session's one warm parent process; started at the first run, ended with pytest."""

    _instance: "_Zygote | None" = None

    @classmethod
    def get(cls) -> "_Zygote":
        if cls._instance is None or cls._instance.proc.poll() is not None:
            cls._instance = cls()
        return cls._instance

    def __init__(self) -> None:
        import atexit
        import json

        self._json = json
        read, write = os.pipe()
        self.log = tempfile.TemporaryDirectory(prefix="zygote-")
        self.stderr = open(Path(self.log.name) / "zygote.stderr", "w")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "zygote.py"), str(write)],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self.stderr,
                                     pass_fds=(write,), text=True, env={**os.environ, **FIXED_ENV})
        os.close(write)
        self.answers, self.pending = read, b""
        if not self._read(timeout=300).get("ready"):
            raise RuntimeError("the test zygote did not start: " + (Path(self.log.name) / "zygote.stderr").read_text())
        atexit.register(self.close)

    def _read(self, timeout: float | None) -> dict:
        """The next answer line (raw reads: a buffered file would hide a second line from select)."""
        import select

        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.answers], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.answers, 65536)
            if not chunk:
                raise RuntimeError("the test zygote died: " + (Path(self.log.name) / "zygote.stderr").read_text()[-3000:])
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return self._json.loads(line)

    def run(self, launcher: str, script: Path, nproc: int, args: list[str], env: dict,
            timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
        logs = tempfile.mkdtemp(dir=self.log.name)
        request = {"launcher": launcher, "script": str(script), "args": [str(a) for a in args], "nproc": nproc,
                   "env": env, "cwd": str(cwd or os.getcwd()), "logs": logs}
        self.proc.stdin.write(self._json.dumps(request) + "\n")
        self.proc.stdin.flush()
        pid = self._read(timeout=60)["pid"]
        cmd = [launcher, str(script), *request["args"]]
        try:
            code = self._read(timeout=timeout)["returncode"]
        except TimeoutError:
            try:
                os.killpg(pid, 9)
            except ProcessLookupError:
                pass
            self._read(timeout=60)
            raise subprocess.TimeoutExpired(cmd, timeout, self._joined(logs, "stdout"),
                                            self._joined(logs, "stderr")) from None
        return subprocess.CompletedProcess(cmd, code, self._joined(logs, "stdout"), self._joined(logs, "stderr"))

    @staticmethod
    def _joined(logs: str, stream: str) -> str:
        files = [Path(logs, f"launcher.{stream}"), *sorted(Path(logs).glob(f"rank*.{stream}"),
                                                           key=lambda p: int(p.name[4:].split(".")[0]))]
        return "".join(f.read_text(errors="replace") for f in files if f.exists())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.stderr.close()
        self.log.cleanup()


ROOT = Path(__file__).resolve().parent.parent
CPU_CONFIG = ROOT / "launch_configs" / "cpu.yaml"


def accelerate_launch(script: str | Path, nproc: int, args: list[str], timeout: float = 900,
                      env: dict | None = None, config: Path = CPU_CONFIG, real: bool = False) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file launch_configs/cpu.yaml`` (or ``config``) with N processes,
    as a user runs it. ``real=True`` (or ``IST_TEST_LAUNCHER=torchrun``) starts the ``accelerate``
    command itself; otherwise Accelerate's launch command runs in the warm zygote and only the
    ranks' start is a fork (tests/zygote.py)."""
    launch_args = ["--config_file", str(config), "--num_processes", str(nproc), "--main_process_port",
                   str(free_port()), str(script), *[str(a) for a in args]]
    if _use_zygote(real, env):
        return _Zygote.get().run("accelerate", Path(script), nproc, launch_args, env or {}, timeout, ROOT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
