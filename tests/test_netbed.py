"""benchmarks/netbed.py: shaped multi-node networks on one machine, torn down whatever happens;
and the IST recipe across two such nodes, its bytes counted by the kernel (issue 36)."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT.parent / "shared" / "datasets" / "mnist"
sys.path.insert(0, str(ROOT / "benchmarks"))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


netbed = _load("netbed")
CAN = os.geteuid() == 0 and shutil.which("ip") and shutil.which("tc") \
    and subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0
needs_root = pytest.mark.skipif(not CAN, reason="network namespaces need root, ip and tc (CI runs as root)")


def mine(pid: int) -> list[str]:
    return [ns for ns in netbed.existing() if ns.startswith(f"{netbed.PREFIX}{pid}-")]


def test_bad_input_is_refused_before_anything_exists():
    for rate in ("fast", "0mbit", "-5mbit", "100"):
        with pytest.raises(ValueError, match="rate must be a positive number with a unit"):
            netbed.Netbed(2, rate)
    with pytest.raises(ValueError, match="nodes must be an integer in 1..200, got 0"):
        netbed.Netbed(0)
    assert netbed.rate_bits("20mbit") == 20e6 and netbed.rate_bits("none") == 0


@pytest.mark.parametrize("flags,message", [
    (["--network", "4x20mbps", "--train-seconds", "5"], "rate must be a positive number with a unit"),
    (["--network", "3x20mbit", "--train-seconds", "5"], "the nodes must equal --num-subnets 4"),
    (["--network", "4x20mbit"], "--network needs --train-seconds"),
    (["--network", "4x20mbit", "--train-seconds", "inf"], "--network needs --train-seconds"),
    (["--network", "4x20mbit", "--train-seconds", "5", "--target", "nan"], "--target is an accuracy in [0, 1)"),
    (["--network", "4x20mbit", "--train-seconds", "5", "--target", "0.5", "1.5"], "--target is an accuracy in [0, 1)"),
    (["--network", "4x20mbit", "--train-seconds", "5", "--made-only"], "--made-only: no run under"),
])
def test_compare_network_refuses_bad_flags_before_any_network(tmp_path, flags, message):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--task", "mnist", "--num-subnets",
                           "4", "--out", str(tmp_path), *flags], capture_output=True, text=True, timeout=60)
    assert proc.returncode and message in proc.stderr, proc.stderr[-2000:]
    assert not any(tmp_path.iterdir())


@needs_root
def test_clear_error_without_root_or_tools():
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import netbed; netbed.Netbed(2).up()"
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
                          capture_output=True, text=True)
    assert proc.returncode and "the network bed needs root" in proc.stderr, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PATH": "/nonexistent"})
    assert proc.returncode and "needs ip and tc (iproute2) on PATH" in proc.stderr, proc.stderr[-2000:]


@needs_root
def test_shaped_links_count_bytes_and_always_come_down():
    with netbed.Netbed(2, "100mbit") as net:
        assert len(mine(os.getpid())) == 3  # two nodes and the hub
        before = net.counters()
        server = net.popen(0, [sys.executable, "-c", "import socket; s = socket.create_server(('0.0.0.0', 5001)); "
                               "c, _ = s.accept(); n = 0\nwhile (b := c.recv(1 << 20)): n += len(b)\nprint(n)"],
                           stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        started = time.monotonic()
        sent = net.run(1, [sys.executable, "-c", f"import socket; s = socket.create_connection(('{net.address(0)}', "
                                                  "5001)); s.sendall(bytes(5_000_000)); s.close()"])
        assert sent.returncode == 0, sent.stderr
        assert server.communicate(timeout=30)[0].strip() == "5000000"
        seconds = time.monotonic() - started  # until the server has it all (sendall returns once it is queued)
        after = net.counters()
        tx = after[1]["tx_bytes"] - before[1]["tx_bytes"]
        assert 5_000_000 < tx < 5_000_000 * 1.06  # the payload and its TCP/IP framing
        assert after[0]["rx_bytes"] - before[0]["rx_bytes"] == pytest.approx(tx, rel=0.01)
        assert seconds > 5_000_000 * 8 / 100e6 * 0.9  # shaped: 40 MB/s would not be
    assert mine(os.getpid()) == []
    with pytest.raises(RuntimeError, match="boom"):  # an exception inside the block
        with netbed.Netbed(2, "20mbit"):
            raise RuntimeError("boom")
    assert mine(os.getpid()) == []


@needs_root
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_a_signalled_harness_leaves_no_network(how):
    sleeper = ["sleep", str(300 + list(signal.Signals).index(getattr(signal, how)))]  # its own, under xdist too
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import netbed\n"
            "with netbed.Netbed(2, '100mbit') as net:\n"
            f"    p = net.popen(1, {sleeper!r})\n    print('up', flush=True)\n    time.sleep(300)\n")
    # as from a shell: pytest-xdist's workers ignore SIGINT, and an ignored signal is inherited
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().strip() == "up"
    assert len(mine(proc.pid)) == 3
    proc.send_signal(getattr(signal, how))
    proc.wait(timeout=30)
    if how == "SIGKILL":  # nothing runs on SIGKILL: the next harness sweeps what a dead one left
        assert len(mine(proc.pid)) == 3
        assert sorted(netbed.Netbed.sweep()) == sorted(f"{netbed.PREFIX}{proc.pid}-{n}" for n in ("0", "1", "hub"))
    assert mine(proc.pid) == []
    assert subprocess.run(["pgrep", "-fx", " ".join(sleeper)], capture_output=True).returncode  # its node's process is gone


@pytest.mark.long
@needs_root
@pytest.mark.skipif(not MNIST.exists(), reason=f"real data missing: {MNIST} (../shared absent)")
def test_ist_recipe_across_two_shaped_nodes_counted_by_the_kernel(tmp_path):
    """accelerate launch --num_machines 2, one launcher per node, gloo over eth0 at 100 Mbit/s:
    what each node's interface sent (minus idle) against what the run reports."""
    network = _load("network")
    out = tmp_path / "ist"
    recipe = [str(ROOT / "recipes" / "ist_mlp.py"), "--data", str(MNIST), "--method", "ist", "--num-subnets", "2",
              "--max-steps", "60", "--local-steps", "10", "--eval-every", "30", "--hidden", "256", "256",
              "--batch-size", "64", "--output-dir", str(out)]
    run = network.run_on_network(recipe, out, nodes=2, rate="100mbit", timeout=240)
    assert mine(os.getpid()) == []
    assert run["rounds"] == 6 and len(run["history"]) == 2
    assert all(p["wall_seconds"] > 0 and p["eval_seconds"] >= 0 for p in run["history"])
    assert run["history"][1]["eval_seconds"] > 0  # the first evaluation's time, kept off the clock
    kernel = run["network"]["kernel_tx_bytes_per_node"]
    reported = run["total_bytes_sent_per_worker"]  # exchange, evaluation's gathers, results, set-up (wiretap)
    # the kernel saw every byte the run reports, plus TCP/IP framing (~1-5 %) and the c10d store's
    # rendezvous and per-step checks, which torch.distributed's wiretap does not see
    assert sum(kernel) >= 2 * reported
    assert sum(kernel) <= 1.08 * 2 * reported + 2 * 400_000, (kernel, reported)
    assert run["bytes_sent_per_worker"] == pytest.approx(run["bytes_lower_per_worker"], rel=0.10)
    results = json.loads((out / "results.json").read_text())
    assert results["network"]["rate"] == "100mbit"


@pytest.mark.long
@needs_root
@pytest.mark.skipif(not MNIST.exists(), reason=f"real data missing: {MNIST} (../shared absent)")
def test_node_local_folders_by_node_across_two_hosts(tmp_path):
    """Issue 35 across hosts: one launcher per network node (``--machine_rank``), ``{node}`` in
    ``--data``: each node reads only its own folder (other digits, other sizes), and the
    global model is scored on both nodes' test sets."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_node_local import CLASSES, NODES, write_node_folders

    network = _load("network")
    write_node_folders(tmp_path / "data")
    out = tmp_path / "ist"
    recipe = [str(ROOT / "recipes" / "ist_mlp.py"), "--data", str(tmp_path / "data" / "node{node}"), "--classes",
              CLASSES, "--method", "ist", "--num-subnets", "2", "--max-steps", "10", "--local-steps", "5",
              "--eval-every", "5", "--hidden", "32", "32", "--batch-size", "16", "--output-dir", str(out)]
    run = network.run_on_network(recipe, out, nodes=2, rate="100mbit", timeout=240)
    assert mine(os.getpid()) == []
    assert run["split"] == "node-local" and run["steps"] == 10 and run["rounds"] == 2
    for rank, record in enumerate(run["data_per_rank"]):
        spec = NODES[rank]
        assert (record["node"], record["path"]) == (rank, str(tmp_path / "data" / f"node{rank}"))
        assert record["train_classes"] == {str(d): spec["train"] for d in spec["classes"]}
    assert run["evaluated_on"] == {"split": "node-local test", "items": 80}


@needs_root
def test_linkprobe_moves_each_pattern_near_the_rate_and_leaves_no_network():
    """benchmarks/linkprobe.py on 2 nodes at 50 Mbit/s: one flow, the ring all-reduce and the
    engine's own point-to-point exchange each deliver between half the rate and the rate."""
    linkprobe = _load("linkprobe")
    with pytest.raises(ValueError, match="nodes must be at least 2"):
        linkprobe.probe(1, "50mbit")
    result = linkprobe.probe(2, "50mbit", megabytes=1.0, repeats=1)
    shares = {name: r["of_nominal"] for name, r in result["patterns"].items()}
    for name in ("pair", "ring all-reduce", "all-to-all, the engine's"):
        assert 0.5 < shares[name] < 1.05, shares
    assert not mine(os.getpid())


def test_step_time_counts_flops_and_times_a_worker_step(tmp_path):
    """benchmarks/step_time.py on a tiny batch: a step time, and torch's FLOP count against the
    hand count for ResNet-20 (about 41 M multiply-adds forward a 32x32 image: 82 MFLOP, and
    twice that backward)."""
    script = str(ROOT / "benchmarks" / "step_time.py")
    bad = subprocess.run([sys.executable, script, "--batch", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode and "--batch, --workers and --steps must be >= 1; got 0" in bad.stderr
    out = tmp_path / "step.json"
    subprocess.run([sys.executable, script, "--model", "preact_resnet20", "--batch", "2", "--workers", "2",
                    "--steps", "1", "--json", str(out)], check=True, capture_output=True, timeout=300)
    record = json.loads(out.read_text())
    assert record["seconds_per_step"] > 0 and len(record["all_seconds"]) == 2
    assert 2.2e8 < record["flops_per_step"] / 2 < 2.7e8, record["flops_per_step"]


def test_modeled_time_to_target_by_hand():
    """benchmarks/network.py's model, on hand-made runs: the basis run's wall-clock to the target
    plus its exchange bytes by then at the rate (less those at the basis's own rate when the basis
    is the fastest link, not an unshaped one), and at what a probe measured the link to deliver."""
    network = _load("network_summary")

    def run(points, rounds=2, sync=1.0):
        return {"history": [{"step": s, "accuracy": a, "wall_seconds": w, "bytes_sent_per_worker": b, "eval_seconds": 0}
                            for s, a, w, b in points],
                "bytes_measured": True, "bytes_sent_per_worker": points[-1][3], "rounds": rounds, "sync_seconds": sync,
                "steps": points[-1][0], "final_accuracy": points[-1][1], "train_seconds": points[-1][2],
                "network": {"elapsed_seconds": points[-1][2] + 5, "kernel_tx_bytes_per_node": [2e6, 2e6]}}

    fast = run([(10, 0.3, 10.0, 1e6), (20, 0.6, 20.0, 2e6)])
    slow = run([(10, 0.3, 14.0, 1e6), (20, 0.6, 28.0, 2e6)])
    runs = {"1gbit": {"ist": [fast], "ddp": [fast]}, "20mbit": {"ist": [slow], "ddp": [slow]}}
    assert network.model_basis(runs) == "1gbit" and network.model_basis({"none": {}, **runs}) == "none"
    probes = {"1gbit": {"patterns": {"all-to-all, the engine's": {"effective_bits_per_second": 5e8},
                                     "ring all-reduce": {"effective_bits_per_second": 1e9}}},
              "20mbit": {"patterns": {"all-to-all, the engine's": {"effective_bits_per_second": 10e6},
                                      "ring all-reduce": {"effective_bits_per_second": 20e6}}}}
    summary = network.summarize(runs, 0.5, 30, probes)
    ist, ddp = summary["20mbit"]["ist"], summary["20mbit"]["ddp"]
    assert ist["wall_seconds_to_target"] == [28.0] and ist["wall_seconds_last_below_target"] == [14.0]
    assert ist["wall_seconds_to_target_interpolated"] == [pytest.approx(14 + (0.5 - 0.3) / 0.3 * 14)]  # 23.33
    # the basis crosses 0.5 two thirds of the way from step 10 to 20: 16.67 s, 1.667 MB
    t, b = 10 + 2 / 3 * 10, 1e6 + 2 / 3 * 1e6
    assert ist["modeled_seconds_to_target"] == [pytest.approx(t + b * 8 * (1 / 20e6 - 1 / 1e9))]  # 17.32
    assert ist["modeled_seconds_to_target_probed"] == [pytest.approx(t + b * 8 * (1 / 10e6 - 1 / 5e8))]  # 17.97
    assert ddp["modeled_seconds_to_target_probed"] == ddp["modeled_seconds_to_target"]
    assert ist["rate_seconds_per_round"] == [pytest.approx(2e6 * 8 / 20e6 / 2)] and ist["sync_seconds_per_round"] == [0.5]
    assert "modeled_seconds_to_target" not in summary["1gbit"]["ist"]  # the basis itself
    unreached = network.summarize(runs, 0.9, 30)["20mbit"]["ist"]
    assert unreached["wall_seconds_to_target"] == [None] and unreached["modeled_seconds_to_target"] == [None]
