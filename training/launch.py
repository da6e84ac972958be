"""Launching ``python -m training.train`` under torchrun for a ``<nodes>x<devices per node>`` topology.

On one machine every node of the topology gets its own torchrun launcher (node ranks 0..n-1 meeting
on 127.0.0.1); on a cluster each machine runs only its own ``node_rank``. The job is watched: when a
launcher fails, the others are stopped at once; past the timeout all are stopped; either way every
process of the job (launchers and their workers, which torchrun starts in sessions of their own)
is gone before ``run_job`` returns (found by an environment variable they all inherit).
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

TOPOLOGY = re.compile(r"^(\d+)x(\d+)$")
GRACE_S = 10.0


class JobError(RuntimeError):
    """The distributed job failed or timed out; the message names the first failure and its output."""


@dataclass(frozen=True)
class Topology:
    nnodes: int
    nproc_per_node: int
    node_rank: Optional[int] = None  # None: simulate every node on this machine
    master_addr: str = "127.0.0.1"
    master_port: Optional[int] = None
    # Seconds a node waits for the others to meet (torchrun's own default is 600).
    rendezvous_timeout: int = 300

    @classmethod
    def parse(cls, name: str, **kwargs) -> "Topology":
        m = TOPOLOGY.match(name)
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise ValueError(f"topology {name!r}: expected <nodes>x<devices per node>, e.g. 1x1, 1x8, 2x8")
        return cls(int(m.group(1)), int(m.group(2)), **kwargs)

    @property
    def name(self) -> str:
        return f"{self.nnodes}x{self.nproc_per_node}"

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def local_node_ranks(self) -> List[int]:
        return list(range(self.nnodes)) if self.node_rank is None else [self.node_rank]

    def where(self, port: int) -> str:
        """The options that make the nodes meet, for a failure message."""
        me = "every node on this machine" if self.node_rank is None else f"--node-rank {self.node_rank}"
        return (f"{me} of --nnodes {self.nnodes}, meeting at --master-addr {self.master_addr} "
                f"--master-port {port} within {self.rendezvous_timeout} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(topology: Topology, node_rank: int, port: int, train_args: Sequence[str]) -> List[str]:
    """torchrun's options spelled with underscores, the only spelling torch 1.12's torchrun knows."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(topology.nnodes), "--nproc_per_node", str(topology.nproc_per_node),
        "--node_rank", str(node_rank), "--master_addr", topology.master_addr, "--master_port", str(port),
        "--max_restarts", "0", "--monitor_interval", "0.5", "--rdzv_conf", f"timeout={topology.rendezvous_timeout}",
        "-m", "training.train", *train_args,
    ]


@dataclass
class Launcher:
    node_rank: int
    proc: subprocess.Popen
    log_path: Path
    lines: List[str] = field(default_factory=list)
    reader: Optional[threading.Thread] = None


JOB_ENV = "DETR_TRAIN_JOB"


def job_processes(job_id: str) -> List[int]:
    """Live processes of the job: all inherit ``DETR_TRAIN_JOB=<job_id>``, even once orphaned (Linux /proc)."""
    needle = f"{JOB_ENV}={job_id}".encode()
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0") and _alive(int(entry)):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _signal(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop(launchers: Sequence[Launcher], job_id: str, grace_s: float = GRACE_S) -> None:
    """SIGTERM to the launchers (torchrun then stops its workers), SIGKILL to every job process left
    after ``grace_s``."""
    _signal([launcher.proc.pid for launcher in launchers if launcher.proc.poll() is None], signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if all(launcher.proc.poll() is not None for launcher in launchers) and not job_processes(job_id):
            break
        time.sleep(0.1)
    _signal(job_processes(job_id), signal.SIGKILL)
    for launcher in launchers:
        if launcher.proc.poll() is None:
            launcher.proc.kill()
        launcher.proc.wait()


def _read(launcher: Launcher) -> None:
    with open(launcher.log_path, "a", encoding="utf-8", errors="replace") as log:
        for line in launcher.proc.stdout:
            log.write(line)
            log.flush()
            launcher.lines.append(line.rstrip("\n"))


def first_failure(lines: Sequence[str]) -> str:
    """The error torchrun reports as root cause, or the last exception line in the output."""
    text = "\n".join(lines)
    m = re.search(r"Root Cause \(first observed failure\):\n(.*?)(?:\n=+|\Z)", text, re.S)
    error = re.compile(r"\s*(\[rank\d+\]:)?\s*[\w.]*(Error|Exception|Interrupt)\b.*:")
    errors = [line.strip() for line in lines if error.match(line)]
    parts = []
    if errors:
        parts.append(errors[-1])
    if m:
        parts.append(m.group(1).strip())
    return "\n".join(parts) or "\n".join(lines[-15:])


def hung_ranks(train_args: Sequence[str]) -> str:
    """From the ranks' timeout reports in the job's ``--output-dir``: which ranks hung (the ones the
    others waited for), or "" when no rank reported a collective timeout."""
    args = list(train_args)
    if "--output-dir" not in args[:-1]:
        return ""
    reports = []
    for path in sorted((Path(args[args.index("--output-dir") + 1]) / "ranks").glob("rank*.timeout.json")):
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if not reports:
        return ""
    waiting = sorted({r["rank"] for r in reports})
    late = {m["rank"]: m for r in reports for m in r.get("not_arrived", []) if m["rank"] not in waiting}
    first = reports[0]
    where = (f"rank(s) {', '.join(map(str, waiting))} timed out waiting in step {first.get('step')}, "
             f"{first.get('phase')}")
    if not late:
        return f"{where}; no rank was behind them"
    hung = "; ".join(f"rank {k} hung (last in step {m['step']}, {m['phase']})" for k, m in sorted(late.items()))
    return f"{hung}: {where}"


@dataclass
class _RunningJob:
    """A started job: its launchers, its id (in every process's environment), when it started, and how
    many of node 0's output lines ``on_line`` has been given."""

    topology: Topology
    train_args: Sequence[str]
    job_id: str
    start: float
    on_line: Optional[Callable[[str], None]] = None
    launchers: List[Launcher] = field(default_factory=list)
    shown: int = 0
    port: int = 0

    def show(self) -> None:
        """Passes node 0's lines read since the last call to ``on_line``."""
        lines = self.launchers[0].lines
        end = len(lines)
        if self.on_line is not None:
            for line in lines[self.shown:end]:
                self.on_line(line)
        self.shown = end


def run_job(
    topology: Topology,
    train_args: Sequence[str],
    log_dir: Path,
    timeout_s: float,
    env: Optional[Dict[str, str]] = None,
    on_line: Optional[Callable[[str], None]] = None,
) -> float:
    """Runs the job to completion and returns its wall time (launch to the last exit).

    ``on_line`` gets node 0's output lines, called from this thread (so that pytest can write them
    past its output capture). Raises JobError naming the failed node and its first error, or the
    timeout; no process is left.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    port = topology.master_port or free_port()
    job_id = uuid.uuid4().hex
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {}), JOB_ENV: job_id}
    job = _RunningJob(topology, train_args, job_id, time.monotonic(), on_line, port=port)
    try:
        for node_rank in topology.local_node_ranks():
            job.launchers.append(_launch(topology, node_rank, port, train_args, log_dir / f"node{node_rank}.log",
                                         full_env))
        return _watch(job, timeout_s)
    except BaseException:
        stop(job.launchers, job_id)
        raise


def _launch(topology: Topology, node_rank: int, port: int, train_args: Sequence[str], log_path: Path,
            env: Dict[str, str]) -> Launcher:
    """Starts node ``node_rank``'s torchrun in a session of its own; a thread copies its output to ``log_path``."""
    log_path.write_text("")
    proc = subprocess.Popen(
        torchrun_command(topology, node_rank, port, train_args), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True, preexec_fn=_stop_with_parent,
    )
    launcher = Launcher(node_rank, proc, log_path)
    launcher.reader = threading.Thread(target=_read, args=(launcher,), daemon=True)
    launcher.reader.start()
    return launcher


def _stop_with_parent() -> None:
    """In the launcher, before torchrun starts: Linux sends it SIGTERM when the process that started it
    dies (even by SIGKILL), and torchrun then stops its ranks, so a killed session leaves no job."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _watch(job: _RunningJob, timeout_s: float) -> float:
    """Polls the launchers until all exit 0 (returns the wall time), one fails or ``timeout_s`` passes
    (stops all and raises JobError)."""
    launchers = job.launchers
    while True:
        job.show()
        codes = [launcher.proc.poll() for launcher in launchers]
        failed = [launcher for launcher, code in zip(launchers, codes) if code not in (None, 0)]
        if failed:
            stop(launchers, job.job_id)
            _join(launchers)
            job.show()
            raise JobError(_failure(job, failed[0]))
        if all(code == 0 for code in codes):
            _join(launchers)
            job.show()
            return time.monotonic() - job.start
        if time.monotonic() - job.start > timeout_s:
            stop(launchers, job.job_id)
            _join(launchers)
            raise JobError(
                f"{job.topology.name} job timed out after {timeout_s:.0f}s and was stopped "
                f"({job.topology.where(job.port)}); last output of node 0:\n"
                + "\n".join(launchers[0].lines[-10:]) + f"\n(full output: {launchers[0].log_path})"
            )
        time.sleep(0.2)


def _failure(job: _RunningJob, bad: Launcher) -> str:
    """JobError's message: the node that failed first, the ranks that hung, and any other failed node."""
    blame = hung_ranks(job.train_args)
    # a rank's crash also fails its peers' collectives; the node seen first may be a peer
    also = "".join(f"\nnode {other.node_rank} also failed (exit code {other.proc.returncode}):\n"
                   f"{first_failure(other.lines)}\n(full output: {other.log_path})"
                   for other in job.launchers if other is not bad and (other.proc.returncode or 0) > 0)
    return (
        f"{job.topology.name} job failed on node {bad.node_rank} (exit code {bad.proc.returncode}) "
        f"after {time.monotonic() - job.start:.1f}s ({job.topology.where(job.port)}):\n"
        f"{blame + chr(10) if blame else ''}"
        f"{first_failure(bad.lines)}\n(full output: {bad.log_path}){also}"
    )


def _join(launchers: Sequence[Launcher]) -> None:
    for launcher in launchers:
        if launcher.reader is not None:
            launcher.reader.join(timeout=5)
