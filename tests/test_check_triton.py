"""tools/check_triton.py: the recorded interpreted launches really go through Triton's
compiler for a GPU, so code the interpreter accepts but the compiler rejects fails.

The probe kernel repeats the bug the first H200 run found in Adafactor's kernels
(benchmarks/results/nvidia-h200-2026-11-26-notes.md): `.to()` on an int argument, which
the interpreter runs for any value but Triton compiles into a constant, with no `.to()`,
when the value is 1."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "check_triton.py")

PROBE = '''
import triton
import triton.language as tl


@triton.jit
def probe_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n.to(tl.int64)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2, mask=mask)
'''

RECORD = '''
import sys, torch
sys.path.insert(0, {tools!r})
from check_triton import record_launches
record_launches({log!r})
from probe import probe_kernel
for n in {sizes!r}:
    x = torch.ones(n)
    probe_kernel[(1,)](x, n, BLOCK=128)
    assert x.sum().item() == 2 * n  # the interpreter runs every size
'''


def _check(tmp_path, sizes):
    (tmp_path / "probe.py").write_text(PROBE)
    log = str(tmp_path / "launches.jsonl")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    script = RECORD.format(tools=os.path.dirname(TOOL), log=log, sizes=sizes)
    subprocess.run([sys.executable, "-c", script], env=env, check=True)
    return subprocess.run([sys.executable, TOOL, "--log", log, "--jobs", "1"], env=env,
                          capture_output=True, text=True)


@pytest.mark.parametrize("sizes,fails", [([100, 32], False), ([100, 1], True)],
                         ids=["compiles", "int_of_1_fails"])
def test_compile_check_catches_what_the_interpreter_runs(tmp_path, sizes, fails):
    out = _check(tmp_path, sizes)
    report = out.stdout + out.stderr
    assert (out.returncode != 0) == fails, report
    assert ("FAILED sm_90 probe.probe_kernel" in report) == fails, report
    if not fails:  # 100 and 32: two specializations (32 is divisible by 16, 100 is not)
        assert "probe.probe_kernel: 2" in report, report
