"""Benchmarks: each fused op vs its eager reference vs torch.compile(reference), in one run.

- cases.py: the shape sets and what a case is; each op's case is `bench_<op>` in its
  umae/<op>_op.py, found through the registry;
- timing.py: timers (do_bench on CUDA, a perf_counter loop on CPU) and the measured ceilings;
- runner.py: the run over ops x shapes x dtypes x modes x providers, and the training step;
- report.py: speedups, the table, results files and the generated tables (docs/benchmarks.md, README);
- plots.py: speedup.png and roofline.png.

CPU figures are not GPU figures. Importing this package changes no global setting: what a
run needs (no donated buffers, one Inductor compile thread) is set around the run.
"""
from .cases import SHAPES, SWEEP, Case, NotApplicable, case
from .plots import plot
from .report import add_fractions, format_table, speedups, write
from .runner import E2E, E2E_DEFAULT, E2E_OPS, HF_E2E, environment, parity_error, profile, run, run_e2e
from .timing import MODES, PROVIDERS, ceilings, mode_fn, provider_forward, time_ms

__all__ = ["SHAPES", "SWEEP", "Case", "NotApplicable", "case", "plot", "add_fractions", "format_table", "speedups",
           "write", "E2E", "E2E_DEFAULT", "E2E_OPS", "HF_E2E", "environment", "parity_error", "profile", "run", "run_e2e", "MODES",
           "PROVIDERS", "ceilings", "mode_fn", "provider_forward", "time_ms"]
