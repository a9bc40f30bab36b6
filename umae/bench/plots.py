"""speedup.png and roofline.png from a run's rows."""
from __future__ import annotations

import os


def plot(rows, ceil, out_dir):
    """speedup.png (fused vs eager and vs compile, fwd+bwd) and roofline.png (fraction of the
    measured copy bandwidth / matrix peak, fused, fwd+bwd)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fused = [r for r in rows if r.get("provider") == "fused" and "ms" in r]
    if any(r["mode"] in ("fwd+bwd", "step") for r in fused):  # the full step when it was measured
        fused = [r for r in fused if r["mode"] in ("fwd+bwd", "step")]
    if not fused:
        return []
    labels = [f"{r['op']} {r['mode']}\n{r['shape']} {r['dtype']}" for r in fused]
    paths = []
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(fused)), 4))
    x = range(len(fused))
    ax.bar([i - 0.2 for i in x], [r.get("speedup_vs_eager", 0) for r in fused], 0.4, label="vs eager reference")
    ax.bar([i + 0.2 for i in x], [r.get("speedup_vs_compile", 0) for r in fused], 0.4, label="vs torch.compile(reference)")
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xticks(list(x), labels, rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("speedup of the fused op")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "speedup.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(fused)), 4))
    ax.bar(list(x), [100 * r.get("frac_matmul_peak", r.get("frac_copy_bw", 0)) for r in fused])
    ax.set_xticks(list(x), labels, rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("% of measured ceiling")
    ax.set_title(f"copy {ceil['copy_gbps']:.0f} GB/s, matmul {ceil['matmul_tflops']:.1f} TFLOP/s "
                 f"({ceil['matmul_dtype']}); uniformity vs matmul, others vs copy", fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "roofline.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
