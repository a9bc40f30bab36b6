"""What checks the kernels without timing them: parity, what runs, and the GPU code compiled and
counted on any machine.

- check.py, grid.py: `umae check`, each op's fused implementations against its reference over its
  parity grid (shapes, flags, memory layouts, autocast; the grids are the benchmark cases' inputs,
  umae/bench/cases.py);
- info.py: `umae info`, which implementation each op runs and why; `--kernels`, the sm_90 compile
  and static audit; `--traffic`, the counted bytes;
- jit.py: the Triton kernels compiled for sm_90 as the JIT would specialize the launches (at the
  benchmark cases, the test token shapes and each model's training step), without a GPU;
- audit.py: their static audit (registers, spills, shared memory, occupancy, 128-bit accesses), and
  the CUDA extension's;
- traffic.py: the bytes each op moves, counted (fused in the Triton interpreter, eager per aten op)
  against its floor.

Counted and compiled, never timed: a speed claim comes from `umae bench`.
"""
