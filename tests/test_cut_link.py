"""A node's network link cut mid-run (issue 36, item 6), on two network namespaces joined by
100 Mbit/s links (benchmarks/netbed.py): every node, the cut-off one included, ends within
``--sync-timeout`` plus a few seconds with ``ISTSyncError``, its launcher exits non-zero, and
``--resume auto`` on every node, once the link is back, continues from the last checkpoint.

The cut-off node used to hang for ~15 minutes (TCP's retransmission limit) in the step's
one round trip to the rendezvous store (``peer_failed``): torch's TCPStore client waits for
an answer with no timeout of its own. Needs root and iproute2 (``ip``, ``tc``)."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ist_accel import checkpoint as ckpt

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT.parent / "shared" / "datasets" / "mnist"
NODES_CONFIG = ROOT / "launch_configs" / "cpu_nodes.yaml"
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
SYNC_TIMEOUT = 10  # --sync-timeout (seconds)
SLACK = 15  # the peer computes to its round end; the error is told; the interpreter (~3 s) and launcher exit
LOCAL_STEPS = 200  # rounds of ~2 s: the cut lands mid-round, where each step makes a round trip to the store
CUT = 1  # the node whose link is cut (node 0 hosts the store; node 1 reaches it over the cut link)


def _netbed():
    spec = importlib.util.spec_from_file_location("netbed", ROOT / "benchmarks" / "netbed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _host_problem() -> str | None:
    if os.geteuid() != 0:
        return f"needs root for network namespaces and tc (running as uid {os.geteuid()})"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"needs {' and '.join(missing)} (iproute2) on PATH"
    return None


def _launch(net, node: int, out: Path, log: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(NODES_CONFIG),
           "--num_machines", "2", "--machine_rank", str(node), "--main_process_ip", net.address(0),
           "--num_processes", "2", str(ROOT / "recipes" / "ist_mlp.py"), "--data", str(MNIST), "--num-subnets", "2",
           "--hidden", "64", "64", "--local-steps", str(LOCAL_STEPS), "--checkpoint-every", str(LOCAL_STEPS),
           "--eval-every", "0", "--eval-samples", "1000", "--sync-timeout", str(SYNC_TIMEOUT),
           "--output-dir", str(out), *extra]
    with open(log, "w") as f:
        return net.popen(node, cmd, env=ENV, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)


def _last_checkpoint(out: Path) -> int:
    done = [int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*") if ckpt.is_complete(p)]
    return max(done, default=0)


@pytest.mark.long
@pytest.mark.skipif(not MNIST.exists(), reason=f"real data missing: {MNIST} (../shared absent)")
@pytest.mark.skipif(_host_problem() is not None, reason=str(_host_problem()))
def test_a_cut_link_ends_every_node_with_ISTSyncError_and_resume_continues(tmp_path):
    netbed = _netbed()
    netbed.Netbed.sweep()
    out = tmp_path / "run"
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    tail = lambda i: logs[i].read_text(errors="replace")[-4000:]  # noqa: E731
    ended: dict[int, float] = {}
    with netbed.Netbed(2, "100mbit") as net:
        tag = net.tag
        procs = [_launch(net, i, out, logs[i], ["--max-steps", "1000000"]) for i in range(2)]
        deadline = time.monotonic() + 120
        while not _last_checkpoint(out):  # the first checkpoint: the run is going, and there is one to resume
            assert time.monotonic() < deadline, f"no checkpoint after 120 s:\n{tail(0)}\n{tail(1)}"
            assert all(p.poll() is None for p in procs), f"a node ended before the cut:\n{tail(0)}\n{tail(1)}"
            time.sleep(0.05)
        time.sleep(0.2)  # out of the checkpoint's barrier, into the next round
        net.set_link(CUT, up=False)
        cut = time.monotonic()
        while len(ended) < 2 and time.monotonic() - cut < SYNC_TIMEOUT + SLACK:
            for i, p in enumerate(procs):
                if i not in ended and p.poll() is not None:
                    ended[i] = time.monotonic() - cut
            time.sleep(0.05)
        last = _last_checkpoint(out)
        for i, p in enumerate(procs):
            assert i in ended, (f"node {i}{' (cut off)' if i == CUT else ''} still running "
                                f"{SYNC_TIMEOUT + SLACK} s after the cut (sync timeout {SYNC_TIMEOUT} s):\n{tail(i)}")
            text = logs[i].read_text(errors="replace")
            assert p.returncode != 0, f"node {i}'s launcher exited 0 after the cut:\n{tail(i)}"
            assert "ISTSyncError" in text, f"node {i} ended without ISTSyncError:\n{tail(i)}"
            assert "restart" in text and "checkpoint" in text, f"node {i} gave no advice:\n{tail(i)}"
        cut_text = logs[CUT].read_text(errors="replace")
        assert re.search(r"ISTSyncError: (rank 1 lost its connection to the rendezvous store|.*failed on rank 1)",
                         cut_text), f"the cut-off node does not say what failed:\n{tail(CUT)}"
        print(f"after the cut: node 0 ended in {ended[0]:.1f} s, node 1 (cut off) in {ended[1]:.1f} s "
              f"(sync timeout {SYNC_TIMEOUT} s); "
              f"{'store' if 'rendezvous store' in cut_text else 'collective'} path on the cut-off node")

        net.set_link(CUT, up=True)
        resumed = [tmp_path / f"resume{i}.log" for i in range(2)]
        target = last + LOCAL_STEPS
        procs = [_launch(net, i, out, resumed[i], ["--max-steps", str(target), "--resume", "auto"]) for i in range(2)]
        for i, p in enumerate(procs):
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the resumed node {i} did not end in 120 s:\n{resumed[i].read_text()[-4000:]}")
            assert p.returncode == 0, f"resumed node {i} failed:\n{resumed[i].read_text()[-4000:]}"
    assert f"resuming from {out / 'checkpoints'}/step_{last:08d}" in resumed[0].read_text()
    assert json.loads((out / "results.json").read_text())["steps"] == target
    assert [ns for ns in netbed.existing() if ns.startswith(f"{tag}-")] == [], "the network bed left namespaces"


def test_the_store_connection_gets_the_sync_timeout(monkeypatch):
    """What makes the cut-off node end: its connection to the rendezvous store carries
    TCP_USER_TIMEOUT = the sync timeout (and keepalive), so an unanswered request fails in time."""
    import datetime
    import socket

    import torch.distributed as dist

    from ist_accel import lifecycle

    if not sys.platform.startswith("linux"):
        pytest.skip("TCP_USER_TIMEOUT and /proc/self/net/tcp are Linux's")
    server = dist.TCPStore("127.0.0.1", 0, 2, True, datetime.timedelta(seconds=5), wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", server.port, 2, False, datetime.timedelta(seconds=5))
    client.add("k", 1)
    monkeypatch.setattr(lifecycle, "store_address", lambda: ("127.0.0.1", server.port))
    fds = lifecycle._connections_to_port(server.port)
    assert len(fds) == 2  # the client's and the master's own (the server's side has the port as its local port)
    assert lifecycle.bound_store_connection(7.5) == 2
    for fd in fds:
        with socket.socket(fileno=os.dup(fd)) as sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 7500
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 2
    assert client.add("k", 1) == 2  # a healthy store still answers
    monkeypatch.setattr(lifecycle, "store_address", lambda: None)  # no TCPStore (a file or hash store): nothing to do
    assert lifecycle.bound_store_connection(7.5) == 0
    del client, server
