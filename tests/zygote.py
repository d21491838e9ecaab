"""A warm parent for the tests' multi-process runs (issue 18).

On 2 cores each rank of a run spent 5-13 s importing torch, transformers, accelerate and
deepspeed before doing anything; the suite launched ~60 such runs. This process imports
those libraries once and then forks every run's ranks from itself, each with the environment
torchrun gives a rank (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, TORCHELASTIC_RUN_ID,
...). A rank runs the worker script as ``__main__`` exactly as torchrun would, and the run
ends as torchrun ends one: when a rank fails, the others are terminated.

Nothing of ist_accel is imported here: it reads ``IST_FAULT`` and other settings from the
environment at import time, so every rank imports it fresh, under its own environment.
Only variables that the libraries imported here read at import time are fixed for the
life of the zygote (``FIXED_ENV``); a run asking for other values of them is launched by
the real torchrun instead (``tests/launch.py``).

Protocol: one JSON request per line on stdin, ``{"script", "args", "nproc", "env", "cwd",
"logs"}``; the answer, on the descriptor given as argv[1], is first ``{"pids": [...]}`` and
then ``{"returncodes": [...]}`` once every rank has ended.
"""

import json
import os
import runpy
import signal
import socket
import sys
import threading
import time
import traceback

FIXED_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
             "TOKENIZERS_PARALLELISM": "false",
             "JE_ARROW_MALLOC_CONF": "background_thread:false"}  # pyarrow's jemalloc thread, started at import


def warm_up() -> None:
    """Import what the workers import; nothing here may start a thread (fork keeps only ours)."""
    import torch  # noqa: F401
    import torch.distributed  # noqa: F401
    import torch.distributed.run  # noqa: F401
    import accelerate  # noqa: F401
    import transformers

    transformers.Trainer, transformers.Seq2SeqTrainer, transformers.GPT2LMHeadModel  # noqa: B018 (lazy modules)
    transformers.LlamaForCausalLM, transformers.T5ForConditionalGeneration  # noqa: B018
    import datasets  # noqa: F401
    import safetensors.torch  # noqa: F401
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        pass
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        raise RuntimeError(f"the zygote started threads while importing ({threading.enumerate()}, "
                           f"{len(os.listdir('/proc/self/task'))} OS threads): forking it is unsafe")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(request: dict, rank: int, port: int) -> None:
    """In the forked child: become rank ``rank`` and run the script; never returns."""
    code = 1
    try:
        os.setpgid(0, 0)  # the rank and whatever it starts can be killed as one group
        nproc = request["nproc"]
        logs = request["logs"]
        out = os.open(os.path.join(logs, f"rank{rank}.stdout"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        err = os.open(os.path.join(logs, f"rank{rank}.stderr"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.environ.update(request["env"])
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
                           "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "ROLE_WORLD_SIZE": str(nproc),
                           "GROUP_WORLD_SIZE": "1", "ROLE_NAME": "default", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": f"zygote-{port}",
                           "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0"})
        os.chdir(request["cwd"])
        script = request["script"]
        sys.argv = [script, *request["args"]]
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def wait_all(pids: list[int]) -> list[int]:
    """torchrun's rule: when a rank fails, the others get SIGTERM, then SIGKILL after 10 s."""
    codes: dict[int, int] = {}
    deadline = None
    while len(codes) < len(pids):
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if deadline is not None and time.monotonic() > deadline:
                for p in pids:
                    if p not in codes:
                        _signal_group(p, signal.SIGKILL)
                deadline = None
            time.sleep(0.02)
            continue
        if pid not in pids:
            continue
        codes[pid] = os.waitstatus_to_exitcode(status)
        if codes[pid] != 0 and deadline is None and len(codes) < len(pids):
            for p in pids:
                if p not in codes:
                    _signal_group(p, signal.SIGTERM)
            deadline = time.monotonic() + 10
    return [codes[p] for p in pids]


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def main() -> None:
    answers = os.fdopen(int(sys.argv[1]), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to our stderr, never into the answers
    warm_up()
    answers.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        port = free_port()
        pids = []
        for rank in range(request["nproc"]):
            pid = os.fork()
            if pid == 0:
                answers.close()
                run_rank(request, rank, port)
            pids.append(pid)
        answers.write(json.dumps({"pids": pids}) + "\n")
        answers.write(json.dumps({"returncodes": wait_all(pids)}) + "\n")


if __name__ == "__main__":
    os.environ.update(FIXED_ENV)
    main()
