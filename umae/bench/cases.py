"""The named shape sets and each op's benchmark case (`bench_<op>` in the op's module, listed in
CASES by op name): `case(op, shape, dtype, device)`. What a case is: umae/ops/_spec.py `Case`.
"""
from __future__ import annotations

import torch

from ..ops import registry
from ..ops._spec import Case, NotApplicable, elt, rand, vit_shape  # noqa: F401  (what the bench reads from here)


# name -> (N, image size, patch, channels, encoder dim, decoder dim); unif_*: B rows of D features
SHAPES = {
    "vit_b16": dict(N=256, img=224, p=16, C=3, D=768, Dd=512),
    "vit_l16": dict(N=128, img=224, p=16, C=3, D=1024, Dd=512),
    "vit_tiny32": dict(N=512, img=32, p=4, C=3, D=192, Dd=128),
    "cpu_small": dict(N=16, img=224, p=16, C=3, D=768, Dd=512),  # the CPU report and pytest-benchmark
    "cpu_large": dict(N=64, img=224, p=16, C=3, D=768, Dd=512),  # images 38.5 MB: beyond a 32 MB L3
    "unif_b256": dict(B=256, D=768), "unif_b1024": dict(B=1024, D=768),
    "unif_b4096": dict(B=4096, D=768), "unif_b16384": dict(B=16384, D=768),
    # eager's B x B fp32 similarity: 17 GB at 65,536 rows, 69 GB at 131,072; the fused Gram is D x D
    "unif_b65536": dict(B=65536, D=768), "unif_b131072": dict(B=131072, D=768),
    # scripts/gpu_check.sh --dry-run: every stage's code at sizes a CPU runs in seconds
    "tiny": dict(N=3, img=32, p=8, C=3, D=64, Dd=48), "unif_tiny": dict(B=70, D=96),  # D % 16 == 0, as encoder widths are
}
# the ViT-B/16 training step at batch 256 (runner.E2E; the ops at this name are vit_b16's)
SHAPES["vit_b16_b256"] = dict(SHAPES["vit_b16"])
# the batch sweep: how cost grows with N at ViT-B/16 shapes
SWEEP = ()
for _n in (32, 64, 128, 256, 512):
    SWEEP += (f"vit_b16_n{_n}",)
    SHAPES[SWEEP[-1]] = dict(SHAPES["vit_b16"], N=_n)

# `umae bench` without --full: each op fwd+bwd at one shape set (the uniformity loss also at a batch
# where its Gram is the cost), and the U-MAE training step; --full: DEFAULT_SHAPES, every mode
QUICK_SHAPES = {"cuda": ["vit_b16", "unif_b16384"], "cpu": ["cpu_small"]}
QUICK_DTYPES = {"cuda": [torch.bfloat16], "cpu": [torch.float32]}
DEFAULT_SHAPES = {"cuda": ["vit_b16", "vit_l16", "vit_tiny32", "unif_b1024", "unif_b4096", "unif_b16384"],
                  "cpu": ["cpu_small", "cpu_large"]}
DEFAULT_DTYPES = {"cuda": [torch.bfloat16, torch.float32], "cpu": [torch.float32]}


def case(op: str, shape: str | dict, dtype, device) -> Case:
    """The registry's case for `op` at a named shape set (or a shape dict); NotApplicable if
    the shape set does not describe the op's inputs."""
    s = SHAPES[shape] if isinstance(shape, str) else shape
    c = CASES[op](s, dtype, device)
    c.shape = shape if isinstance(shape, str) else "custom"
    return c


# each op's case, as its module defines it (umae/ops/<op>_op.py bench_<op>)
CASES = {name: op.bench for name, op in registry.OPS.items()}
