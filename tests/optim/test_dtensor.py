"""Every optimizer and clip_grad_norm_ on DTensor params (FSDP2's fully_shard, HSDP,
2-D sharding), and ours inside DDP + ZeroRedundancyOptimizer, on 4 CPU processes in a
gloo group: each case of dtensor_worker.py against a plain one-process run of the same
maths, or against torch.optim in the same setup. The processes run once per module (spawning 4 Python processes costs
seconds); each case is reported as its own test."""
from __future__ import annotations

import json
import socket
import time

import pytest
import torch
import torch.distributed as dist

import dtensor_worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dtensor")
    ctx = torch.multiprocessing.start_processes(
        dtensor_worker.run, args=(str(out), _free_port()), nprocs=dtensor_worker.WORLD,
        join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the DTensor ranks did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [json.loads((out / f"rank{r}.json").read_text())
            for r in range(dtensor_worker.WORLD)]


@pytest.mark.parametrize("name", list(dtensor_worker.CASES))
def test_dtensor_case(results, name):
    if all(name not in res for res in results):
        pytest.skip("not run (DLOPT_DTENSOR_CASES)")
    failures = [f"rank {r}:\n{res.get(name, 'not run')}" for r, res in enumerate(results)
                if res.get(name, "not run") is not None]
    assert not failures, "\n".join(failures)


def test_rule_registration_is_lazy():
    """Importing dlopt_kernels does not import torch.distributed.tensor (0.5 s)."""
    import subprocess
    import sys
    code = ("import sys, dlopt_kernels, dlopt_kernels.optim; "
            "print('torch.distributed.tensor' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


def test_register_dtensor_rules_for_direct_op_calls():
    """With dlopt_kernels imported first, torch.ops.dlopt.* refuse DTensors until
    dlopt_kernels.ops.register_dtensor_rules() (a one-rank gloo group, its own process)."""
    import subprocess
    import sys
    code = """
import os, socket, torch, torch.distributed as dist
import dlopt_kernels
from dlopt_kernels.ops import register_dtensor_rules
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
dist.init_process_group("gloo", rank=0, world_size=1)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
mesh = init_device_mesh("cpu", (1,))
x = distribute_tensor(torch.ones(6, 2), mesh, [Shard(0)])
try:
    torch.ops.dlopt.multi_tensor_norm([x], 2.0)
    print("no error before registering")
except NotImplementedError:
    pass
register_dtensor_rules()
norms, total = torch.ops.dlopt.multi_tensor_norm([x], 2.0)
print(float(total.full_tensor()))
dist.destroy_process_group()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(out.stdout.split()) == 1, out.stdout  # nothing printed before registering
    assert abs(float(out.stdout) - 12 ** 0.5) <= 1e-6 * 12 ** 0.5, out.stdout


def test_dtensor_benchmark_quick():
    """benchmarks/bench_dtensor.py runs (quick sizes; in its own process, whose gloo
    group it starts and ends) and reports its targets."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_dtensor.py"),
                          "--quick", "--no-progress"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[tiny_1000]" in out.stdout and "torch fused" in out.stdout, out.stdout[-3000:]


def test_dtensor_benchmark_refuses_a_gpu_device():
    """The DTensor benchmark runs on a gloo (CPU) mesh: another device is a ValueError
    naming it, before any process group starts."""
    import torch.distributed as dist

    from dlopt_kernels.bench import dtensor
    with pytest.raises(ValueError, match="runs on the CPU"):
        dtensor.build_cases(torch.device("meta"), quick=True)
    assert not dist.is_initialized()


def test_register_dtensor_rules_without_torch_distributed(monkeypatch):
    """A torch built without torch.distributed: a RuntimeError that says so."""
    from dlopt_kernels.ops import _dtensor
    monkeypatch.setattr(_dtensor.dist, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no torch.distributed"):
        _dtensor.register_dtensor_rules()
