"""The local Slurm the Slurm tests will run on (issue 14): it starts, runs a real batch job with an afterok
dependency, and its daemons are gone afterwards. Skips with the reason where Slurm cannot run (not root, no apt)."""

from __future__ import annotations

import subprocess

import pytest
from slurm_cluster import SlurmCluster, Unavailable


@pytest.mark.slow
def test_local_slurm_runs_a_dependent_chain_and_stops(tmp_path):
    cluster = SlurmCluster(tmp_path / "slurm")
    try:
        cluster.start()
    except Unavailable as why:
        pytest.skip(str(why))
    try:
        first, second = tmp_path / "first.sh", tmp_path / "second.sh"
        first.write_text(f"#!/bin/bash\necho first $SLURM_JOB_ID > {tmp_path}/first.out\n")
        second.write_text(f"#!/bin/bash\ncat {tmp_path}/first.out > {tmp_path}/second.out\n")
        a = cluster.run("sbatch", "--parsable", f"--output={tmp_path}/a-%j.log", str(first)).stdout.strip()
        b = cluster.run("sbatch", "--parsable", f"--dependency=afterok:{a}", f"--output={tmp_path}/b-%j.log",
                        str(second)).stdout.strip()
        assert cluster.wait([a, b], timeout=120) == {a: "COMPLETED", b: "COMPLETED"}
        assert (tmp_path / "second.out").read_text() == f"first {a}\n"  # b ran after a, on a's output
    finally:
        cluster.stop()
    daemons = subprocess.run(["pgrep", "-af", f"slurm.*{cluster.conf}"], capture_output=True, text=True).stdout
    assert daemons == "", daemons
