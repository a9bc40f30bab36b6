"""Triton kernels, installed as `umae.kernels` (the folder is `kernels/` in the repo).

One op per file. Each file holds the @triton.jit kernels, the launchers that allocate
outputs and pick block sizes by a rule (no autotuning: the same rule runs under the
interpreter), and `aot_specs(...)`: the (kernel, signature, constexprs, num_warps) each
launcher uses, so tests can compile every configuration for sm_90 without a GPU.
"""
