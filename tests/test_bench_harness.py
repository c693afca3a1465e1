"""The benchmark harness's clocks, on a simulated GPU (host and GPU timelines): queued
timings give a step's GPU time while the host keeps ahead and the host's time where it
does not; timings from an idle GPU add the host's time before the kernel; events are
read only after the GPU has passed them; run_case reports both kinds. Then the same
harness on the CPU, and the report / tables with idle columns."""
import pytest
import torch

from dlopt_kernels.bench import common
from dlopt_kernels.bench.report import format_report


class SimGPU:
    """One stream: work launched by the host starts when both the host has launched it
    and the GPU has finished what came before."""

    def __init__(self):
        self.host = 0.0
        self.gpu = 0.0

    def host_work(self, ms):
        self.host += ms

    def launch(self, ms):
        self.gpu = max(self.host, self.gpu) + ms

    def sync(self):
        self.host = max(self.host, self.gpu)


class SimEvent:
    def __init__(self, sim):
        self.sim, self.t = sim, None

    def record(self):
        self.sim.launch(0.0)
        self.t = self.sim.gpu

    def elapsed_time(self, end):
        assert self.t is not None and end.t is not None, "an event read before it was recorded"
        assert self.sim.host >= end.t, "an event read before the GPU reached it (no sync)"
        return end.t - self.t


class SimClock(common._Clock):
    def __init__(self, sim, flush_ms=0.1):
        super().__init__(torch.device("cpu"), 0)
        self.cuda, self.sim, self.flush_ms = True, sim, flush_ms

    def event(self):
        return SimEvent(self.sim)

    def sync(self):
        self.sim.sync()

    def _flush(self):
        self.sim.launch(self.flush_ms)


def sim_step(sim, host_ms, gpu_ms):
    def step():
        sim.host_work(host_ms)
        sim.launch(gpu_ms)
    return step


@pytest.mark.parametrize("host_ms,gpu_ms", [(0.2, 1.0), (0.05, 0.3), (1.0, 0.1), (0.5, 0.5),
                                             (0.3, 0.35)])
def test_queued_and_idle_timings_on_a_simulated_gpu(host_ms, gpu_ms):
    sim = SimGPU()
    clock = SimClock(sim)
    step = sim_step(sim, host_ms, gpu_ms)
    queued = clock.time_queued(step, 20)
    assert len(queued) == 20
    if host_ms + clock.flush_ms <= gpu_ms:  # the host keeps ahead: the GPU's time
        assert queued == pytest.approx([gpu_ms] * 20)
    else:  # the host's time, less what the flush and the kernels overlap of it
        for q in queued:
            assert max(host_ms, gpu_ms) - clock.flush_ms - 1e-9 <= q <= host_ms + gpu_ms
    # from an idle GPU: the host's time before the kernel, then the kernel
    assert clock.time_ms(step) == pytest.approx(host_ms + gpu_ms)


def test_queued_reads_keep_order_and_wait_for_the_gpu():
    sim = SimGPU()
    clock = SimClock(sim)
    n = 3 * clock.MAX_PENDING + 5  # several reads while queueing
    for i in range(n):
        clock.enqueue(i, sim_step(sim, 0.01, 0.1 + 0.001 * i))
    out = clock.drain()
    assert [k for k, _ in out] == list(range(n))
    assert [ms for _, ms in out] == pytest.approx([0.1 + 0.001 * i for i in range(n)])
    assert clock.drain() == [] and not clock.pending


class SimRunner(common.Runner):
    def __init__(self, sim, host_ms, gpu_ms, numel):
        self.step = sim_step(sim, host_ms, gpu_ms)
        self.numel = numel

    def bytes_per_param(self):
        return 28.0


def test_run_case_reports_queued_and_idle_times_on_a_simulated_gpu():
    sim = SimGPU()
    impls = [common.Impl("ours", "ours", lambda: SimRunner(sim, 0.4, 1.0, 10**8)),
             common.Impl("base", "baseline", lambda: SimRunner(sim, 0.05, 1.2, 10**8))]
    case = common.Case("sim", "simulated", 10**8, 1, impls)
    settings = common.Settings(warmup=2, min_rounds=40, max_rounds=40, budget_s=1e9)
    res = common.run_case(case, torch.device("cuda"), settings, bandwidth_gbps=2800.0,
                          progress=False, clock=SimClock(sim))
    rows = {r["label"]: r for r in res["results"]}
    assert res["rounds"] == 40
    idle_rounds = 40 // common.IDLE_EVERY
    for label, host_ms, gpu_ms in (("ours", 0.4, 1.0), ("base", 0.05, 1.2)):
        r = rows[label]
        assert len(r["samples_ms"]) == 40 - idle_rounds
        assert len(r["idle_samples_ms"]) == idle_rounds
        assert r["median_ms"] == pytest.approx(gpu_ms)
        assert r["idle_median_ms"] == pytest.approx(host_ms + gpu_ms)
        assert r["idle_pct_bandwidth"] == pytest.approx(
            100 * 28 * 10**8 / (host_ms + gpu_ms) / 1e6 / 2800.0)
    (sp,) = res["speedups"]
    assert sp["speedup"] == pytest.approx(1.2 / 1.0)
    assert sp["speedup_idle"] == pytest.approx(1.25 / 1.4)
    assert sp["speedup_paired_median"] == pytest.approx(1.2)


def test_run_case_on_the_cpu_has_no_idle_times():
    x = torch.zeros(1000)

    class Add(common.Runner):
        numel = 1000

        def step(self):
            x.add_(1.0)

        def bytes_per_param(self):
            return 8.0

    case = common.Case("cpu", "cpu", 1000, 1, [common.Impl("ours", "ours", Add),
                                                common.Impl("base", "baseline", Add)])
    settings = common.Settings(warmup=1, min_rounds=5, max_rounds=5, budget_s=1e9)
    res = common.run_case(case, torch.device("cpu"), settings, None, progress=False)
    for r in res["results"]:
        assert len(r["samples_ms"]) == 5 and "idle_median_ms" not in r
    assert "speedup_idle" not in res["speedups"][0]
    assert float(x[0]) == 2 * (1 + 5)  # every warm-up and timed step ran, once each


def _gpu_section():
    """A section as a GPU run now writes it, from simulated steps."""
    sim = SimGPU()
    impls = [common.Impl("dlopt[cuda]", "ours", lambda: SimRunner(sim, 0.4, 1.0, 10**8)),
             common.Impl("torch fused", "baseline", lambda: SimRunner(sim, 0.05, 1.2, 10**8))]
    settings = common.Settings(warmup=1, min_rounds=8, max_rounds=8, budget_s=1e9)
    case = common.run_case(common.Case("gpt2_small", "sim", 10**8, 1, impls),
                           torch.device("cuda"), settings, 2800.0, progress=False,
                           clock=SimClock(sim))
    env = {"device": "sim-gpu", "device_name": "sim", "cpu_cores": 16, "torch": "x",
           "torch_threads": 16, "device_type": "cuda", "load_average": [0.0]}
    section = {"benchmark": "optim_adam", "quick": False, "env": env, "timing": "queued",
               "bandwidth": {"gbps": 2800.0, "method": "copy", "numel": 2**28,
                             "bytes_per_elem": 8, "samples_ms": [1.0]},
               "cases": [case], "wall_s": 1.0, "load_average_start": [0.0],
               "started_utc": "2026-11-27T00:00:00", "auto_backend": "cuda",
               "ours_backends": ["cuda"]}
    section["targets"] = common.evaluate_targets(
        section, [], "cuda", torch.device("cuda"),
        [("gpt2_small", "dlopt[{b}]", "torch fused", 1.0), ("gpt2_small", "dlopt[{b}]", None, 85)],
        ["cuda"])
    return section


def test_report_and_tables_show_idle_times_beside_the_queued_ones(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    section = _gpu_section()
    text = format_report(section)
    assert "idle ms" in text and "timing: queued" in text
    assert "speedup of dlopt[cuda] vs torch fused = 1.20x (target >= 1x); from an idle GPU 0.89x" in text
    path = tmp_path / "sim.json"
    path.write_text(json.dumps({"benchmarks": {"optim_adam": section}}))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "tables.py"
    out = subprocess.run([sys.executable, str(script), str(path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "from an idle GPU: ours ms, speedups, % of BW |" in out.stdout
    assert "| 1.40; 0.89x; 71% |" in out.stdout
    assert "; from an idle GPU 0.89x" in out.stdout
