"""Benchmarks: each fused op vs its eager reference vs torch.compile(reference), in one run.

- cases.py: the shape sets, what a case is, and each op's case (`bench_<op>`, in CASES) and parity grid (GRIDS);
- timing.py: timers (do_bench on CUDA, a perf_counter loop on CPU) and the measured ceilings;
- runner.py: the run over ops x shapes x dtypes x modes x providers, and the training step;
- report.py: speedups, the table, results files and the generated tables (docs/benchmarks.md, README);
- plots.py: speedup.png and roofline.png;
- host.py, loader.py, profile_steps.py, tune.py: the other measurements, `umae bench host | loader |
  profile | tune`; costs.py: each step's ATen calls and bytes saved for backward;
- command.py, report_command.py: `umae bench`, `umae report`.

What checks the kernels without timing them (`umae check`, `umae info`, the sm_90 compile, the
static audit, the counted traffic) is umae/verify/.

CPU figures are not GPU figures. Importing this package changes no global setting: what a
run needs (no donated buffers, one Inductor compile thread) is set around the run.
"""
from .cases import SHAPES, SWEEP, Case, NotApplicable, case
from .plots import plot
from .report import add_fractions, format_table, speedups, write
from .runner import E2E, E2E_DEFAULT, E2E_OPS, HF_E2E, HF_VIDEO_E2E, VIDEO_E2E, environment, parity_error, profile, run, run_e2e
from .timing import MODES, PROVIDERS, ceilings, mode_fn, provider_forward, time_ms

__all__ = ["SHAPES", "SWEEP", "Case", "NotApplicable", "case", "plot", "add_fractions", "format_table", "speedups",
           "write", "E2E", "E2E_DEFAULT", "E2E_OPS", "HF_E2E", "HF_VIDEO_E2E", "VIDEO_E2E", "environment", "parity_error", "profile", "run", "run_e2e", "MODES",
           "PROVIDERS", "ceilings", "mode_fn", "provider_forward", "time_ms"]
