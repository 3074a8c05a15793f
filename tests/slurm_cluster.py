"""A real single-node Slurm for the tests: Debian's slurmctld, slurmd and munge, started and stopped here.

Nothing is imitated: jobs go through sbatch, wait on afterok dependencies, get requeued by `scontrol
requeue` and signalled by `--signal`, as on a cluster. Everything the daemons write (config, state,
spool, logs, pid files) lives in one temporary folder; the clients find the config through SLURM_CONF,
which `env` carries. The daemons this module starts are stopped by their pids; a munged that was already
running is left alone. Where it cannot run (not root, no apt, no packages), `start` raises Unavailable
with the reason, and the tests skip with it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
MUNGE_KEY = Path("/etc/munge/munge.key")


class Unavailable(Exception):
    """Slurm cannot run here; the message says why."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _install() -> None:
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        raise Unavailable("Slurm is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise Unavailable("Slurm is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            raise Unavailable(f"{' '.join(command)} failed: {done.stderr.strip()[-300:]}")


class SlurmCluster:
    """One node named after this host, one partition `debug`, CPUs from os.cpu_count()."""

    def __init__(self, workdir: Path, *, memory_mb: int = 20000) -> None:
        self.dir = workdir
        self.memory_mb = memory_mb
        self.conf = workdir / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        self.started_munged = False
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> SlurmCluster:
        if os.geteuid() != 0:
            raise Unavailable("a local Slurm needs root (slurmd runs jobs as their users)")
        _install()
        self._start_munge()
        for sub in ("state", "spool", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._config())
        for daemon in ("slurmctld", "slurmd"):
            done = subprocess.run([f"/usr/sbin/{daemon}", "-f", str(self.conf)], capture_output=True, text=True,
                                  env=self.env, timeout=60)
            if done.returncode != 0:
                self.stop()
                raise Unavailable(f"{daemon} did not start: {done.stderr.strip()[-300:]}")
        deadline = time.time() + 60
        while time.time() < deadline:
            state = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.5)
        log = (self.dir / "log" / "slurmctld.log").read_text(errors="replace")[-1500:]
        self.stop()
        raise Unavailable(f"the node never became idle (sinfo said {state!r}); slurmctld log: {log}")

    def stop(self) -> None:
        for daemon in ("slurmd", "slurmctld"):
            pid_file = self.dir / f"{daemon}.pid"
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text().strip())
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    os.kill(pid, 0)
                    time.sleep(0.1)
                os.kill(pid, signal.SIGKILL)
        # Jobs still running under slurmstepd would outlive the daemons: end them too.
        subprocess.run(["pkill", "-f", f"slurmstepd.*{self.dir}"], capture_output=True)
        if self.started_munged:
            subprocess.run(["/usr/sbin/munged", "--stop"], capture_output=True)

    def _start_munge(self) -> None:
        probe = subprocess.run(["munge", "-n"], capture_output=True)
        if probe.returncode == 0:
            return  # a munged is already up (ours from an earlier test session, or the machine's)
        if not MUNGE_KEY.is_file() or MUNGE_KEY.stat().st_size < 32:
            MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
            MUNGE_KEY.write_bytes(os.urandom(1024))
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o400)
        MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_SOCKET.parent, "munge", "munge")
        for folder in ("/var/log/munge", "/var/lib/munge"):
            Path(folder).mkdir(parents=True, exist_ok=True)
            shutil.chown(folder, "munge", "munge")
        done = subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], capture_output=True, text=True)
        if done.returncode != 0:
            raise Unavailable(f"munged did not start: {done.stderr.strip()[-300:]}")
        self.started_munged = True

    def _config(self) -> str:
        d = self.dir
        return "\n".join([
            "ClusterName=sddtest",
            f"SlurmctldHost={self.host}",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "SchedulerType=sched/backfill",
            "JobRequeue=1",
            "ReturnToService=2",
            "MpiDefault=none",
            "KillWait=30",  # between SIGTERM and SIGKILL when a job is cancelled or requeued
            "MinJobAge=600",  # finished jobs stay visible to squeue/scontrol for the tests
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'slurmd.pid'}",
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'log' / 'slurmd.log'}",
            "JobCompType=jobcomp/none",
            "AccountingStorageType=accounting_storage/none",
            f"NodeName={self.host} CPUs={os.cpu_count()} RealMemory={self.memory_mb} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    # -- use --------------------------------------------------------------------------------------
    def run(self, *command: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(list(command), capture_output=True, text=True, env=self.env, cwd=cwd, timeout=120)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()}")
        return done

    def job_state(self, job_id: str) -> str:
        """PENDING, RUNNING, COMPLETED, FAILED...; `scontrol show job` works without accounting."""
        text = self.run("scontrol", "show", "job", job_id, check=False).stdout
        for word in text.split():
            if word.startswith("JobState="):
                return word.split("=", 1)[1]
        return "UNKNOWN"

    def jobs(self) -> list[dict]:
        """Every job slurmctld still knows: id, name, state, reason."""
        out = self.run("squeue", "-h", "-t", "all", "-o", "%i|%j|%T|%r", check=False).stdout
        rows = []
        for line in out.splitlines():
            job_id, name, state, reason = line.split("|", 3)
            rows.append({"id": job_id, "name": name, "state": state, "reason": reason})
        return rows

    def wait(self, job_ids: list[str], *, timeout: float, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                                  "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")) -> dict:
        deadline = time.time() + timeout
        states: dict[str, str] = {}
        while time.time() < deadline:
            states = {job: self.job_state(job) for job in job_ids}
            if all(state in until for state in states.values()):
                return states
            time.sleep(1)
        return states
