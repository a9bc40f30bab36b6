"""What the kernels and their callers both need without importing Triton: whether the interpreter
runs the kernels, and the token ops' output dtype rule.

kernels/ is installed as `umae.kernels` (the link umae/kernels) and is a namespace package (no
__init__.py): in a process whose sys.path holds the repo root it would also be a top-level
`kernels`, PyPI's name (transformers imports that package when it is installed), and a regular
package found anywhere on sys.path wins over a namespace portion, so PyPI's is what `import kernels`
finds. One op per file; each holds its @triton.jit kernels and their launchers (outputs allocated,
block sizes by a rule: no autotuning, so the interpreter runs what the GPU would). Nothing here
imports umae: the kernels are the bottom layer.
"""
import functools
import os

import torch


def interpreted() -> bool:
    """The one place that decides whether Triton kernels run under the interpreter (read without
    importing Triton: umae.ops asks this on machines without it)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def promoted(*tensors) -> torch.dtype:
    """torch's type promotion over the given tensors (None skipped): the token ops' output dtype,
    as their references' adds and cats give it (umae.ops._checks.result_dtype is this)."""
    return functools.reduce(torch.promote_types, [t.dtype for t in tensors if t is not None])
