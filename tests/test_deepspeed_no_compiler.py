"""DeepSpeed on CPU starts where there is no C++ compiler (the product image has none).

Its communication backend JIT-compiles a shared-memory allreduce op on first start; on the one-node
cluster every teacher stage died with `c++: not found`. jobs.train_common.deepspeed_without_a_compiler
turns the op off so DeepSpeed takes gloo's allreduce.
"""
from __future__ import annotations

import os
import subprocess
import sys

from tests.support.kube_cluster import free_port

CODE = """
import sys
import deepspeed
from deepspeed import comm
guard = sys.argv[1] == "guard"
if guard:
    from meddistill.jobs import train_common
    train_common.deepspeed_without_a_compiler()
deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, init_method="tcp://127.0.0.1:%d",
                           rank=0, world_size=1)
import torch
t = torch.ones(3)
comm.all_reduce(t)
print("shm op:", comm.comm.cdb.shm_comm_op, "sum:", t.tolist())
"""


def _run(mode: str, tmp_path) -> subprocess.CompletedProcess:
    # No compiler by that name, and an empty extension cache (the host's may hold a build of the op).
    env = dict(os.environ, CXX="no-such-c++", DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(tmp_path / mode))
    return subprocess.run([sys.executable, "-c", CODE % free_port(), mode], env=env, capture_output=True,
                          text=True, timeout=300, cwd="/")


def test_deepspeed_cpu_backend_starts_without_a_compiler(tmp_path):
    res = _run("guard", tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "shm op: None sum: [1.0, 1.0, 1.0]" in res.stdout


def test_without_the_guard_deepspeed_needs_a_compiler(tmp_path):
    """What the guard is for: unguarded, the same start fails building the op (if DeepSpeed ever stops
    building it without a compiler, this fails and the guard can go)."""
    res = _run("plain", tmp_path)
    assert res.returncode != 0 and "deepspeed_shm_comm" in res.stderr, res.stdout[-2000:] + res.stderr[-2000:]
