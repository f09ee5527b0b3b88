"""A real, small Ray cluster on 127.0.0.1 for the Ray executor's tests: ``ray start --head
--block`` (1 CPU, 80 MB object store, ports the OS hands out, its own temp dir), stopped by the
test's teardown: its process group, then every process whose command line or working directory
is inside the cluster's temp dir (workers, the job's runner and its run), by pid."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port",
              "--object-manager-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
              "--metrics-export-port", "--runtime-env-agent-port")


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _bindable(port: int) -> bool:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def worker_range(taken: list[int], size: int = 200) -> int:
    """The first port of ``size`` free ports in a row, none of them one of ``taken`` (Ray refuses a
    worker port range that overlaps its other components' ports)."""
    for base in range(20000, 60000 - size, size + 11):
        if not any(base <= p < base + size for p in taken) and all(_bindable(p) for p in range(base, base + size)):
            return base
    raise RuntimeError("no free range of worker ports")


class Cluster:
    def __init__(self):
        self.temp = Path(tempfile.mkdtemp(prefix="tqray", dir="/tmp"))   # short: Ray's socket paths
        self.proc = None
        self.address = None

    def start(self, timeout: float = 120) -> str:
        ports = free_ports(len(PORT_FLAGS))
        dash = ports[1]
        lo = worker_range(ports)
        bindir = str(Path(sys.executable).parent)
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
        cmd = [str(Path(bindir) / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--dashboard-host", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0",
               "--object-store-memory", str(80 * 10**6), "--temp-dir", str(self.temp), "--include-dashboard", "true",
               "--disable-usage-stats", "--min-worker-port", str(lo), "--max-worker-port", str(lo + 199)]
        for flag, port in zip(PORT_FLAGS, ports):
            cmd += [flag, str(port)]
        self.log = open(self.temp / "ray-start.log", "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.address = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("ray start ended: " + (self.temp / "ray-start.log").read_text()[-2000:])
            try:
                with urllib.request.urlopen(self.address + "/api/version", timeout=2) as r:
                    json.loads(r.read())
                return self.address
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("the Ray dashboard did not answer in time")

    def pids(self) -> list[int]:
        """Every process of this cluster: in its temp dir by command line or working directory."""
        out, mark = [], str(self.temp)
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                cmd = (d / "cmdline").read_bytes().decode(errors="replace")
                cwd = os.readlink(d / "cwd")
            except OSError:
                continue
            if mark in cmd or cwd.startswith(mark):
                out.append(int(d.name))
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        for _ in range(100):
            left = self.pids() + ([self.proc.pid] if self.proc and self.proc.poll() is None else [])
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.2)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.log.close()
        shutil.rmtree(self.temp, ignore_errors=True)
