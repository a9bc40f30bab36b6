"""Triton kernels, installed as `umae.kernels` (the folder is `kernels/` in the repo).

One op per file. Each file holds the @triton.jit kernels and the launchers that allocate
outputs and pick block sizes by a rule (no autotuning: the same rule runs under the
interpreter). `_jit.py` compiles, for sm_90 and without a GPU, exactly what Triton's JIT
compiles for the launches the launchers make (tests/test_triton_compile.py).
"""
