"""The child processes in which `sdd.verify` has math-verify judge answers, each item under a deadline.

Why children: sympy can spend minutes inside one C-level operation that no signal interrupts, so a
verdict is bounded only by killing the process that computes it; and children are allowed where
`multiprocessing` is not (daemonic DataLoader workers, TRL's reward threads). `sdd._verify_worker` is
one child; this module keeps a small pool of them per process, feeds them, times each item and kills
a child that misses its deadline: that item scores 0 and a fresh child takes the rest of the batch.

`judge(pairs, timeout_s=, workers=)` is the whole interface; `sdd.verify` passes its own
VERIFY_TIMEOUT_S and VERIFY_WORKERS at each call. The pool belongs to the process that started it:
a fork neither uses nor kills its parent's children.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from sdd.errors import SddError

logger = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 60.0
"""Importing sympy takes ~0.5 s idle, but far longer on a 2-core machine shared with training."""

# Share of the deadline the child spends before giving up on its own; it then answers "not
# equivalent" without being killed, which saves the ~0.5 s restart for slow-but-Python-level work.
_SOFT_BUDGET_SHARE = 0.8


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def size_from_env() -> int:
    """Children per process: env SDD_VERIFY_WORKERS, else a quarter of the usable CPUs, 1 to 4."""
    raw = os.environ.get("SDD_VERIFY_WORKERS")
    if raw is None or raw.strip() == "":
        # math-verify needs 3-15 ms of CPU per new LaTeX answer, so children are the throughput; but a
        # trainer shares the machine, so take at most a quarter of it, and 4 at most per process
        # (a DDP job runs one pool per rank).
        return max(1, min(4, _usable_cpus() // 4))
    if not raw.strip().isdigit() or int(raw) < 1:
        raise SddError(f"SDD_VERIFY_WORKERS must be a whole number >= 1, got {raw!r}")
    return int(raw)


_lock = threading.Lock()
# One slot per child; None until needed (or after a kill). Owned by the process that created them.
_workers: list[_Worker | None] = []
# Children inherited through fork() belong to the parent process: never written to, killed or closed
# here (closing could free descriptors the parent still uses); kept referenced so garbage collection
# does not touch them either.
_inherited_workers: list[_Worker] = []


class _Worker:
    """One `python -m sdd._verify_worker` child speaking JSON lines; at most one item in flight.

    Nothing here blocks: the caller's event loop polls `fd`, so one slow start or slow item never
    stalls the deadlines of the others.
    """

    def __init__(self, soft_budget_s: float) -> None:
        package_parent = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        # The child must import this same sdd even when it runs from a checkout, not an install.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        self.owner_pid = os.getpid()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sdd._verify_worker", repr(soft_budget_s)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            env=env,
            close_fds=True,
        )
        self.fd = self.process.stdout.fileno()
        self.ready = False
        self.started_at = time.monotonic()
        self._pending = bytearray()

    def send(self, answer: str, gold: str) -> bool:
        """Write one request; False when the child is gone."""
        # ASCII-only JSON: the child decodes stdin with its locale's encoding, whatever that is.
        request = json.dumps({"a": answer, "g": gold}).encode("ascii") + b"\n"
        try:
            # The idle child reads whole lines, so this completes even past the pipe's capacity.
            written = 0
            while written < len(request):
                written += os.write(self.process.stdin.fileno(), request[written:])
        except OSError:
            return False
        return True

    def read_lines(self) -> list[bytes] | None:
        """The complete lines now readable (after poll said so); None at EOF (the child exited)."""
        chunk = os.read(self.fd, 65536)
        if not chunk:
            return None
        self._pending += chunk
        *lines, rest = self._pending.split(b"\n")
        self._pending = bytearray(rest)
        return lines

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()


def _claim_workers(size: int) -> None:
    """Forget children another process made (we are a fork) and size the pool to `size`."""
    for slot, worker in enumerate(_workers):
        if worker is not None and worker.owner_pid != os.getpid():
            _inherited_workers.append(worker)
            _workers[slot] = None
    while len(_workers) > size:
        worker = _workers.pop()
        if worker is not None:
            worker.kill()
    _workers.extend([None] * (size - len(_workers)))


def discard(slot: int | None = None) -> None:
    """Kill one child (or all): the next batch starts fresh ones."""
    slots = range(len(_workers)) if slot is None else [slot]
    for index in slots:
        worker = _workers[index]
        if worker is not None and worker.owner_pid == os.getpid():
            worker.kill()
        _workers[index] = None


def judge(pairs: Sequence[tuple[str, str]], *, timeout_s: float, workers: int) -> list[tuple[bool, bool | None]]:
    """(equivalent, whether the gold parsed or None if unknown) per (answer, gold); a missed deadline is (False, None).

    An event loop over the pool: each idle child gets the next item with a deadline of `timeout_s`
    from when it was sent; a child that misses it, or exits, is killed, its item scores 0, and a
    fresh child takes its slot for the items still queued.
    """
    replies: list[tuple[bool, bool | None]] = [(False, None)] * len(pairs)
    with _lock:
        _claim_workers(workers)
        queued = list(range(len(pairs)))[::-1]  # popped from the end: first item first
        resent: set[int] = set()
        # slot -> (item index, or None while the child starts; deadline)
        busy: dict[int, tuple[int | None, float]] = {}
        active_slots = range(min(workers, len(pairs)))
        try:
            while queued or busy:
                for slot in active_slots:
                    if slot in busy or not queued:
                        continue
                    worker = _workers[slot]
                    if worker is not None and worker.process.poll() is not None:
                        discard(slot)  # died between batches
                        worker = None
                    if worker is None:
                        worker = _workers[slot] = _Worker(timeout_s * _SOFT_BUDGET_SHARE)
                    if not worker.ready:
                        busy[slot] = (None, worker.started_at + WORKER_START_TIMEOUT_S)
                        continue
                    index = queued.pop()
                    if worker.send(*pairs[index]):
                        busy[slot] = (index, time.monotonic() + timeout_s)
                        continue
                    # The child was gone before it read this item: not the item's fault, so one more try.
                    discard(slot)
                    if index not in resent:
                        resent.add(index)
                        queued.append(index)
                if busy:
                    _wait_for_replies(pairs, replies, busy, timeout_s)
        except BaseException:
            # A child still holding an item would answer the NEXT batch's first request with this
            # batch's verdict; kill it (Ctrl-C, a start-up failure elsewhere in the pool).
            for slot in busy:
                discard(slot)
            raise
    return replies


def _wait_for_replies(pairs, replies: list, busy: dict[int, tuple[int | None, float]], timeout_s: float) -> None:
    poller = select.poll()  # poll, not select: a trainer can hold more than FD_SETSIZE descriptors
    fd_slots = {}
    for slot in busy:
        fd_slots[_workers[slot].fd] = slot
        poller.register(_workers[slot].fd, select.POLLIN)
    wait_s = min(deadline for _, deadline in busy.values()) - time.monotonic()
    for fd, _event in poller.poll(max(0, math.ceil(wait_s * 1000))):
        slot = fd_slots[fd]
        worker = _workers[slot]
        index, _deadline = busy[slot]
        lines = worker.read_lines()
        if lines is None:  # EOF: the child exited (crash, rlimit)
            del busy[slot]
            discard(slot)
            if index is None:
                raise SddError(
                    f"the answer-verification process exited during start-up (code {worker.process.returncode}); "
                    f"check that `{sys.executable} -m sdd._verify_worker` runs (it needs math-verify and sympy)"
                )
            logger.warning(
                "the verifier process exited while judging one answer; scored 0 (%r)", pairs[index][0][:80]
            )
            continue
        if not lines:
            continue  # part of a line so far
        # One request in flight per child, so one reply (or the start-up line) per wake-up.
        del busy[slot]
        try:
            reply = json.loads(lines[0])
        except ValueError:
            reply = {}  # not our protocol: treat like a crash
        if not isinstance(reply, dict) or (index is not None and "ok" not in reply):
            discard(slot)
            continue
        if index is None:
            worker.ready = bool(reply.get("ready"))
            continue
        gold_ok = reply.get("gold_ok")
        replies[index] = (bool(reply["ok"]), None if gold_ok is None else bool(gold_ok))
    now = time.monotonic()
    for slot, (index, deadline) in list(busy.items()):
        if now < deadline:
            continue
        del busy[slot]
        discard(slot)
        if index is None:
            raise SddError(
                f"the answer-verification process did not start within {WORKER_START_TIMEOUT_S:.0f} s; "
                f"check that `{sys.executable} -m sdd._verify_worker` runs"
            )
        logger.warning(
            "verifying one answer took over %.1f s (SDD_VERIFY_TIMEOUT_S); scored 0 and restarted "
            "that verifier process (answer starts %r)",
            timeout_s,
            pairs[index][0][:80],
        )


def _after_fork_in_child() -> None:
    # Another thread may have held the lock at fork time; in the child nobody would ever release it.
    global _lock
    _lock = threading.Lock()
    _claim_workers(len(_workers))


def _kill_all_at_exit() -> None:
    for slot in range(len(_workers)):
        discard(slot)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_kill_all_at_exit)
