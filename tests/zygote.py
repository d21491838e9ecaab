"""A warm parent for the tests' multi-process runs (issue 18).

On 2 cores each rank of a run spent 5-13 s importing torch, transformers, accelerate and
deepspeed before doing anything; the suite launched ~110 such runs. This process imports
those libraries once and then forks every run's ranks from itself, each with the environment
torchrun gives a rank (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, TORCHELASTIC_RUN_ID,
...). A rank runs the worker script as ``__main__`` exactly as torchrun would, and the run
ends as torchrun ends one: when a rank fails, the others are terminated. A run "launched
with ``accelerate launch``" runs Accelerate's own launch command (config file, environment
it gives the ranks); only the final ``torch.distributed.run.run`` is this fork.

Nothing of ist_accel is imported here: it reads ``IST_FAULT`` and other settings from the
environment at import time, so every rank imports it fresh, under its own environment.
Only variables that the libraries imported here read at import time are fixed for the
life of the zygote (``FIXED_ENV``); a run asking for other values of them is launched by
the real torchrun instead (``tests/launch.py``).

Protocol: one JSON request per line on stdin, ``{"launcher": "torchrun" | "accelerate",
"script", "args", "nproc", "env", "cwd", "logs"}`` (for Accelerate, ``args`` are the launch
command's); the answer, on the descriptor given as argv[1], is first ``{"pid"}`` of the
run's launcher (the leader of its process group) and then its ``{"returncode"}``. Output
lands in ``logs``: ``launcher.stdout``, ``rank0.stderr``, ...
"""

import json
import os
import runpy
import signal
import socket
import sys
import threading
import time

FIXED_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
             "TOKENIZERS_PARALLELISM": "false",
             "JE_ARROW_MALLOC_CONF": "background_thread:false"}  # pyarrow's jemalloc thread, started at import


def warm_up() -> None:
    """Import what the workers import; nothing here may start a thread (fork keeps only ours)."""
    import torch  # noqa: F401
    import torch.distributed  # noqa: F401
    import torch.distributed.run  # noqa: F401
    import accelerate  # noqa: F401
    import accelerate.commands.launch  # noqa: F401
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


def run_rank(script: str, args: list[str], rank: int, nproc: int, port: int, logs: str) -> None:
    """In a forked child: become rank ``rank`` of the run and execute the script; never returns."""
    code = 1
    try:
        _redirect(logs, f"rank{rank}")
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
                           "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "ROLE_WORLD_SIZE": str(nproc),
                           "GROUP_WORLD_SIZE": "1", "ROLE_NAME": "default", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": f"zygote-{port}",
                           "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0"})
        sys.argv = [script, *args]
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = _exit_code(e)
    except BaseException:
        sys.excepthook(*sys.exc_info())  # as the interpreter reports it (torch.distributed's hook adds [rankN])
    finally:
        _end(code)


def fork_ranks(script: str, args: list[str], nproc: int, port: int, logs: str) -> None:
    """What torchrun does for one node, by fork: start the ranks, wait, and when one fails stop
    the others (SIGTERM, then SIGKILL after 10 s) and fail as torchrun does (exit 1)."""
    pids = []
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:
            run_rank(script, args, rank, nproc, port, logs)
        pids.append(pid)
    codes = wait_all(pids)
    if any(codes):
        failed = ", ".join(f"rank {r} (exit {c})" for r, c in enumerate(codes) if c)
        print(f"zygote launcher: {script} failed on {failed}", file=sys.stderr)
        raise SystemExit(1)


def run_launcher(request: dict) -> None:
    """In a forked child: launch one run as ``torchrun`` or as ``accelerate launch`` would;
    never returns. For Accelerate, its own ``launch`` command runs (config file, environment,
    DeepSpeed fields) and only its final ``torch.distributed.run.run`` is replaced by fork_ranks."""
    code = 1
    try:
        os.setpgid(0, 0)  # the launcher, its ranks and whatever they start: one group to kill
        _redirect(request["logs"], "launcher")
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        if request["launcher"] == "torchrun":
            fork_ranks(request["script"], request["args"], request["nproc"], free_port(), request["logs"])
        else:
            import torch.distributed.run as distrib_run
            from accelerate.commands import launch

            def run(args) -> None:
                fork_ranks(args.training_script, list(args.training_script_args), int(args.nproc_per_node),
                           int(args.master_port or free_port()), request["logs"])

            distrib_run.run = run
            sys.argv = ["accelerate-launch", *request["args"]]
            launch.main()
        code = 0
    except SystemExit as e:
        code = _exit_code(e)
    except BaseException:
        sys.excepthook(*sys.exc_info())
    finally:
        _end(code)


def _redirect(logs: str, name: str) -> None:
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, stream in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(os.path.join(logs, f"{name}.{stream}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)


def _exit_code(e: SystemExit) -> int:
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)
    return 1


def _end(code: int) -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def wait_all(pids: list[int], grace: float = 1.0) -> list[int]:
    """Exit codes of ``pids``, in order. torchrun's rule, at its 0.1 s monitor interval: when
    one fails, the others are stopped (SIGTERM, SIGKILL 10 s later), after ``grace`` seconds
    in which they may end on their own: a rank that fails at the same moment gets to print
    its own error, as it does under torchrun's slower stop."""
    codes: dict[int, int] = {}
    term_at = kill_at = None
    while len(codes) < len(pids):
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid in pids:
            codes[pid] = os.waitstatus_to_exitcode(status)
            if codes[pid] != 0 and term_at is None:
                term_at = time.monotonic() + grace
            continue
        now = time.monotonic()
        if term_at is not None and now > term_at and kill_at is None:
            for p in pids:
                if p not in codes:
                    _signal(p, signal.SIGTERM)
            kill_at = now + 10
        if kill_at is not None and now > kill_at:
            for p in pids:
                if p not in codes:
                    _signal(p, signal.SIGKILL)
            kill_at = float("inf")
        time.sleep(0.1)
    return [codes[p] for p in pids]


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def main() -> None:
    answers = os.fdopen(int(sys.argv[1]), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to our stderr, never into the answers
    warm_up()
    answers.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            answers.close()
            run_launcher(request)
        answers.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    os.environ.update(FIXED_ENV)
    main()
