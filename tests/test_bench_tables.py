"""benchmarks/tables.py: the README's tables from a committed results file, and clear
refusals of a missing file or an unknown section."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "tables.py"
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("cpu-*.json"))
GPU_RESULTS = sorted((ROOT / "benchmarks" / "results").glob("nvidia-*.json"))


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, timeout=60)


def test_tables_of_a_committed_results_file():
    assert RESULTS, "no results file committed"
    out = _run(RESULTS[-1], "optim_adam")
    assert out.returncode == 0, out.stderr
    assert "**optim_adam**" in out.stdout and "| fp32_10m | dlopt[cpu] " in out.stdout
    assert "target >=" in out.stdout


def test_unknown_section_and_missing_file_are_refused():
    out = _run(RESULTS[-1], "no_such_bench")
    assert out.returncode == 2 and "no section ['no_such_bench']" in out.stderr
    out = _run(ROOT / "no_such_file.json")
    assert out.returncode == 2 and "cannot read results file" in out.stderr
    assert _run().returncode == 2


def test_backend_option_picks_that_backends_rows_and_targets():
    assert GPU_RESULTS, "no GPU results file committed"
    out = _run("--backend", "triton", GPU_RESULTS[-1], "optim_adam")
    assert out.returncode == 0, out.stderr
    assert "| gpt2_small | dlopt[triton] " in out.stdout and "dlopt[cuda]" not in out.stdout
    assert "dlopt[triton] % of measured bandwidth" in out.stdout
    out = _run("--backend", "cpu", GPU_RESULTS[-1], "optim_adam")
    assert out.returncode == 2 and "backend 'cpu' was not timed" in out.stderr
