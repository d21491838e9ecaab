#!/usr/bin/env python
"""N network "nodes" on one Linux machine, joined by shaped links: a test bed for multi-node runs.

Each node is a network namespace with one interface, ``eth0`` (``10.77.<net>.<i+1>/24``),
joined to a bridge that lives in a hub namespace of its own; a ``tbf`` qdisc on both ends of
every link caps it at ``rate`` each way (``sch_netem`` is missing on these machines: bandwidth
is shaped, latency is not). Nothing touches the host's interfaces: every link is created
inside the namespaces, and only their own addresses are used. The kernel's byte counters
(``/sys/class/net/eth0/statistics/{tx,rx}_bytes`` inside a node) are an independent count of
what a run put on the wire.

    with Netbed(nodes=4, rate="100mbit") as net:
        procs = [net.popen(i, ["accelerate", "launch", "--machine_rank", str(i), ...]) for i in range(4)]
        before = net.counters()
        ...

    # or from the shell: the same command in every node, {node} / {nodes} / {master} filled in
    python benchmarks/netbed.py --nodes 2 --rate 100mbit -- \\
        accelerate launch --config_file launch_configs/cpu_nodes.yaml --num_machines {nodes} \\
        --machine_rank {node} --main_process_ip {master} --num_processes {nodes} recipes/ist_mlp.py ...

The network is always torn down: on leaving the ``with`` block, on an exception, on SIGINT or
SIGTERM (turned into an exception first), and at interpreter exit; ``Netbed.sweep()`` removes
what a SIGKILLed harness left (namespaces named ``istnb<pid>-*`` whose process is gone).
Needs root, ``ip`` (iproute2) and ``tc``.
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

PREFIX = "istnb"
_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def rate_bits(rate: str) -> float:
    """``"100mbit"`` -> 1e8 bits per second, ``"none"`` -> 0 (links not shaped); a clear
    ``ValueError`` for anything else."""
    if str(rate).strip().lower() == "none":
        return 0.0
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)", str(rate).strip().lower())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"rate must be a positive number with a unit of {', '.join(_UNITS)} (e.g. 100mbit), "
                         f"or none (not shaped), got {rate!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def check_host() -> None:
    """Raise ``RuntimeError`` naming what is missing for namespaces and shaping, before anything exists."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"the network bed needs {' and '.join(missing)} (iproute2) on PATH: "
                           "apt-get install iproute2")
    if os.geteuid() != 0:
        raise RuntimeError("the network bed needs root (network namespaces, veth links and tc qdiscs); "
                           f"running as uid {os.geteuid()}")
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode:
        raise RuntimeError(f"`ip netns` is not available here: {probe.stderr.strip()}")


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")


def _tc(ns: str, dev: str, bits: float) -> None:
    burst = max(64 * 1024, int(bits / 8 / 50))  # 20 ms at the rate: tbf needs at least rate / HZ
    cmd = ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{int(bits)}bit",
           "burst", str(burst), "latency", "400ms"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"shaping {dev} in {ns} with tbf failed (is sch_tbf in the kernel?): {proc.stderr.strip()}")


class Netbed:
    """``nodes`` namespaces on a shaped star (module docstring)."""

    def __init__(self, nodes: int, rate: str = "100mbit", net: int = 77,
                 sysctls: dict[str, str] | None = None) -> None:
        if isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= 200:
            raise ValueError(f"nodes must be an integer in 1..200, got {nodes!r}")
        if not 0 <= net <= 255:
            raise ValueError(f"net must be in 0..255 (the third byte of 10.77.<net>.x), got {net!r}")
        self.nodes, self.rate, self.bits = nodes, rate, rate_bits(rate)
        self.sysctls = dict(sysctls or {})  # set in every node, e.g. {"net.ipv4.tcp_slow_start_after_idle": "0"}
        self.tag = f"{PREFIX}{os.getpid()}"
        self.hub = f"{self.tag}-hub"
        self.subnet = f"10.{net}.{(os.getpid() % 250) + 1}"
        self.names = [f"{self.tag}-{i}" for i in range(nodes)]
        self._made: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._old_handlers: dict[int, object] = {}

    # ---- lifecycle ----------------------------------------------------------------

    def __enter__(self) -> "Netbed":
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        check_host()
        atexit.register(self.down)
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in (signal.SIGTERM, signal.SIGHUP):  # an exception, so `with` and `finally` tear down
                self._old_handlers[sig] = signal.signal(sig, _raise_interrupt)
        try:
            self._add_namespace(self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            for i, ns in enumerate(self.names):
                self._add_namespace(ns)
                port = f"p{i}"
                _ip("link", "add", port, "netns", self.hub, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("-n", self.hub, "link", "set", port, "master", "br0")
                _ip("-n", self.hub, "link", "set", port, "up")
                _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                for key, value in self.sysctls.items():
                    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"], check=True,
                                   capture_output=True)
                if self.bits:
                    _tc(ns, "eth0", self.bits)  # node -> hub
                    _tc(self.hub, port, self.bits)  # hub -> node
        except BaseException:
            self.down()
            raise

    def _add_namespace(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._made.append(ns)
        # no IPv6 (its neighbour discovery would be idle traffic in the byte counts)
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                        "net.ipv6.conf.default.disable_ipv6=1"], capture_output=True)

    def down(self) -> None:
        """Kill what runs in the nodes and delete every namespace (and with them every link)."""
        for proc in self._procs:
            if proc.poll() is None:
                _kill_group(proc)
        for ns in reversed(self._made):
            _kill_pids(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()
        atexit.unregister(self.down)

    @staticmethod
    def sweep() -> list[str]:
        """Delete namespaces a killed harness left behind (its pid is gone); returns their names."""
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        gone = []
        for ns in (line.split()[0] for line in out.splitlines() if line.strip()):
            m = re.fullmatch(rf"{PREFIX}(\d+)-.*", ns)
            if m and not os.path.exists(f"/proc/{m.group(1)}"):
                _kill_pids(ns)
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
                gone.append(ns)
        return gone

    # ---- nodes --------------------------------------------------------------------

    def address(self, node: int) -> str:
        return f"{self.subnet}.{node + 1}"

    def env(self, node: int) -> dict[str, str]:
        """What a multi-node launch needs in ``node``: the master's address, the node's rank and
        the interface gloo must use (it would otherwise resolve the hostname to loopback)."""
        return {"MASTER_ADDR": self.address(0), "NODE_RANK": str(node), "GLOO_SOCKET_IFNAME": "eth0",
                "TP_SOCKET_IFNAME": "eth0"}

    def popen(self, node: int, cmd: Sequence[str], env: Mapping[str, str] | None = None,
              **kwargs: object) -> subprocess.Popen:
        """Start ``cmd`` inside ``node`` (own process group, killed by :meth:`down`)."""
        full = {**os.environ, **self.env(node), **(env or {})}
        proc = subprocess.Popen(["ip", "netns", "exec", self.names[node], *cmd], env=full, start_new_session=True,
                                **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, node: int, cmd: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.names[node], *cmd], capture_output=True, text=True,
                              **kwargs)

    def counters(self) -> list[dict[str, int]]:
        """Per node, the kernel's byte counts of its ``eth0`` (what it sent and received)."""
        out = []
        for i in range(self.nodes):
            read = self.run(i, ["cat", "/sys/class/net/eth0/statistics/tx_bytes",
                                "/sys/class/net/eth0/statistics/rx_bytes"], check=True).stdout.split()
            out.append({"tx_bytes": int(read[0]), "rx_bytes": int(read[1])})
        return out

    def set_link(self, node: int, up: bool) -> None:
        """Take ``node``'s interface down (a cut cable) or up again."""
        _ip("-n", self.names[node], "link", "set", "eth0", "up" if up else "down")


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _kill_pids(ns: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def existing() -> list[str]:
    """Namespaces this harness made that exist now (any pid)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--rate", default="100mbit", help="per link and direction, e.g. 1gbit, 100mbit, 20mbit")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds before every node's command is killed")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="after --: run in every node; {node}, {nodes}, "
                    "{master} are filled in")
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command to run in every node after --")
    try:  # bad flags and a host that cannot do it: one line, before anything exists
        net = Netbed(args.nodes, args.rate)
        check_host()
    except (ValueError, RuntimeError) as error:
        ap.error(str(error))
    Netbed.sweep()
    with net:
        before = net.counters()
        started = time.monotonic()
        procs = [net.popen(i, [a.format(node=i, nodes=args.nodes, master=net.address(0)) for a in cmd])
                 for i in range(args.nodes)]
        deadline = started + args.timeout
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
        seconds = time.monotonic() - started
        after = net.counters()
    for i, (b, a, code) in enumerate(zip(before, after, codes)):
        print(f"node {i}: exit {code}, eth0 sent {a['tx_bytes'] - b['tx_bytes']:,} B, "
              f"received {a['rx_bytes'] - b['rx_bytes']:,} B", file=sys.stderr)
    print(f"{seconds:.1f} s at {args.rate} per link", file=sys.stderr)
    return max(codes, key=abs)


if __name__ == "__main__":
    sys.exit(main())
