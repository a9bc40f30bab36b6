"""Static audit of the compiled Triton kernels (no GPU): registers and spills (ptxas -v on the PTX
the JIT would build), shared memory, blocks per SM and occupancy on an H100, and the global loads
and stores the PTX issues, vectorized (v2 / v4) or scalar. Counted from the compiled code: these
are not measurements."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

# H100 SXM (sm_90), per SM
H100 = dict(max_warps=64, max_blocks=32, regs=65536, reg_unit=256, smem=228 * 1024, smem_reserved=1024,
            max_smem_block=227 * 1024)


def _ptxas() -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(90).path  # the ptxas Triton itself compiles sm_90 with


def resources(ptx: str) -> dict:
    """registers, spill stores/loads (bytes) of the kernel in `ptx`, from `ptxas -v` for its own .target."""
    arch = re.search(r"\.target\s+(\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([_ptxas(), f"-arch={arch}", "-v", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True, check=True)
    log = r.stderr + r.stdout
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    st = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(regs=regs, spill_stores=int(st.group(1)) if st else 0, spill_loads=int(st.group(2)) if st else 0)


def occupancy(regs: int, warps: int, smem: int, gpu=H100) -> tuple[int, float]:
    """(blocks per SM, fraction of the SM's warp slots) for a block of `warps` warps."""
    regs_per_warp = -(-regs * 32 // gpu["reg_unit"]) * gpu["reg_unit"]
    by_regs = gpu["regs"] // (regs_per_warp * warps) if regs else gpu["max_blocks"]
    by_smem = gpu["smem"] // (smem + gpu["smem_reserved"]) if smem else gpu["max_blocks"]
    blocks = min(gpu["max_blocks"], gpu["max_warps"] // warps, by_regs, by_smem)
    return blocks, blocks * warps / gpu["max_warps"]


def memory_ops(ptx: str) -> dict:
    """Global loads / stores in the PTX, by vector width."""
    out = {}
    for kind in ("ld", "st"):
        ops = re.findall(rf"\b{kind}\.global(?:\.[a-z]+)*?(\.v[248])?\.[bfsu]\d+", ptx)
        out[f"{kind}_vec"] = sum(1 for v in ops if v)
        out[f"{kind}_scalar"] = sum(1 for v in ops if not v)
    return out


def audit(kernel) -> dict:
    """One compiled kernel's audit row."""
    ptx = kernel.asm["ptx"]
    warps, smem = kernel.metadata.num_warps, kernel.metadata.shared
    row = dict(name=kernel.metadata.name, warps=warps, smem=smem, **resources(ptx), **memory_ops(ptx))
    row["blocks_per_sm"], row["occupancy"] = occupancy(row["regs"], warps, smem)
    return row


def format_rows(rows) -> str:
    head = f"{'kernel':<28} {'warps':>5} {'regs':>5} {'spill':>6} {'smem':>7} {'blk/SM':>6} {'occup':>6}  {'ld v/s':>8} {'st v/s':>8}  specialization"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<28} {r['warps']:>5} {r['regs']:>5} {r['spill_stores'] + r['spill_loads']:>6} "
                     f"{r['smem']:>7} {r['blocks_per_sm']:>6} {r['occupancy']:>6.0%}  "
                     f"{r['ld_vec']:>3}/{r['ld_scalar']:<4} {r['st_vec']:>3}/{r['st_scalar']:<4}  {r.get('spec', '')}")
    return "\n".join(lines)
