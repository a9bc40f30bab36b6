"""Static audit of the compiled GPU kernels (no GPU): for each Triton specialization (ptxas -v and
the PTX the JIT would build) and each CUDA kernel of the extension (cuobjdump / nvdisasm on the
built .so): registers, spills, shared memory, blocks per SM and occupancy on an H100, and whether
the accesses to rows of data compiled to 128-bit loads and stores. `problems` / `cuda_problems`
say what a row fails of what the tests require. Counted from the compiled code: these are not
measurements."""
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
    """registers, spill stores/loads (bytes) of the kernel in `ptx`, from `ptxas -v` for its own .target
    with the options Triton's make_cubin passes (its register allocation differs without them)."""
    arch = re.search(r"\.target\s+(\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([_ptxas(), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src, "-o",
                            os.path.join(d, "k.cubin")],
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


_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[A-Za-z0-9:_]+)*?(\.v[248])?\.[bfsu](\d+)\b")
_LOC = re.compile(r"\.loc\s+\d+\s+(\d+)\s+\d+\s*//\s*([\w.]+):")


_LOC_DEF = re.compile(r"^(#loc\d*) = loc\((.*)\)\s*$", re.M)
_TILE_ACCESS = re.compile(r"\btt\.(?:load|store)\b.*: tensor<\d+x\d+x!tt\.ptr<.*loc\((#loc\d*)\)\s*$", re.M)


def tile_lines(ttgir: str) -> set:
    """(file, line) of the source's 2-D tile loads and stores ([rows, BLOCK_D] of a feature row),
    read from the TTGIR's types and locations; 1-D vectors (indices, noise, one token) are not tiles."""
    defs = dict(_LOC_DEF.findall(ttgir))

    def where(ref, depth=0):
        body = defs.get(ref, "")
        m = re.match(r'"([^"]*)":(\d+):\d+', body)
        if m:
            return os.path.basename(m.group(1)), int(m.group(2))
        inner = re.search(r"#loc\d*", body)
        return where(inner.group(0), depth + 1) if inner and depth < 50 else None

    return {w for w in map(where, _TILE_ACCESS.findall(ttgir)) if w}


def memory_ops(ptx: str, tiles=frozenset()) -> dict:
    """Global loads / stores in the PTX: vectorized (v2/v4) and scalar instructions; and, of the
    accesses made for the tile loads / stores at (file, line) in `tiles` (the PTX's .loc), how
    many are not 128-bit."""
    out = dict(ld_vec=0, ld_scalar=0, st_vec=0, st_scalar=0, tile_accesses=0, tile_narrow=0)
    where = None
    for line in ptx.splitlines():
        loc = _LOC.search(line)
        if loc:
            where = (loc.group(2), int(loc.group(1)))
            continue
        m = _ACCESS.search(line)
        if not m:
            continue
        kind, vec, bits = m.group(1), m.group(2), int(m.group(3))
        n = int(vec[2:]) if vec else 1
        out[f"{kind}_{'vec' if n > 1 else 'scalar'}"] += 1
        if where in tiles:
            out["tile_accesses"] += 1
            out["tile_narrow"] += n * bits != 128
    return out


def vector_eligible(src) -> bool:
    """Whether the JIT can prove 16-byte accesses along the feature dimension for this
    specialization: `D` divisible by 16 and every feature-dimension stride (`stride_*_d`) the
    constant 1 (a strided or unaligned input is served by scalar accesses, correctly)."""
    names = src.fn.arg_names
    if "D" not in names:  # no feature rows (the video kernels gather a token's pixels by their strides)
        return False
    d = names.index("D")
    strides = [i for i, n in enumerate(names) if re.fullmatch(r"stride_\w+_d", n)]
    return ["tt.divisibility", 16] in src.attrs.get((d,), []) and all(src.constants.get((i,)) == 1 for i in strides)


def audit(kernel, src=None) -> dict:
    """One compiled kernel's audit row (`vec_ok`: whether `src`, its specialization, allows 128-bit accesses)."""
    ptx = kernel.asm["ptx"]
    warps, smem = kernel.metadata.num_warps, kernel.metadata.shared
    row = dict(name=kernel.metadata.name, warps=warps, smem=smem, **resources(ptx),
               **memory_ops(ptx, tile_lines(kernel.asm["ttgir"])),
               vec_ok=src is not None and vector_eligible(src))
    row["blocks_per_sm"], row["occupancy"] = occupancy(row["regs"], warps, smem)
    return row


def format_rows(rows) -> str:
    head = (f"{'kernel':<28} {'warps':>5} {'regs':>5} {'spill':>6} {'smem':>7} {'blk/SM':>6} {'occup':>6}  "
            f"{'ld v/s':>8} {'st v/s':>8} {'tile !128b':>10}  specialization")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<28} {r['warps']:>5} {r['regs']:>5} {r['spill_stores'] + r['spill_loads']:>6} "
                     f"{r['smem']:>7} {r['blocks_per_sm']:>6} {r['occupancy']:>6.0%}  "
                     f"{r['ld_vec']:>3}/{r['ld_scalar']:<4} {r['st_vec']:>3}/{r['st_scalar']:<4} "
                     f"{r['tile_narrow']:>4}/{r['tile_accesses']:<4}{'*' if r['vec_ok'] else ' '} {r.get('spec', '')}")
    return "\n".join(lines)


def audit_op(op_name: str, **collect) -> list[dict]:
    """Audit rows of every specialization op `op_name`'s launches compile to (umae.verify.jit)."""
    from . import jit

    return [dict(audit(k, src), spec=jit.label(src))
            for _, k, src in jit.compile_all(jit.collect_launches(op_name, **collect))]


MIN_OCCUPANCY = 0.25


def _resource_problems(spill: str, smem: int, occupancy: float) -> list[str]:
    """What every kernel must hold, Triton or CUDA: no spills (`spill` describes them, "" if none),
    shared memory within a block's limit, at least MIN_OCCUPANCY on an H100."""
    out = [f"spills {spill}"] if spill else []
    if smem > H100["max_smem_block"]:
        out.append(f"shared memory {smem} > {H100['max_smem_block']}")
    if occupancy < MIN_OCCUPANCY:
        out.append(f"occupancy {occupancy:.0%} < {MIN_OCCUPANCY:.0%}")
    return out


def problems(row, op_name: str) -> list[str]:
    """What the audit requires of a compiled Triton kernel and this row does not hold."""
    spill = f"{row['spill_stores']}+{row['spill_loads']} bytes" if row["spill_stores"] or row["spill_loads"] else ""
    from .jit import TOKEN_OPS  # row copies: their tile loads and stores are held to 128-bit accesses

    out = _resource_problems(spill, row["smem"], row["occupancy"])
    if op_name in TOKEN_OPS and row["vec_ok"] and row["tile_narrow"]:
        out.append(f"{row['tile_narrow']} of {row['tile_accesses']} tile accesses not 128-bit")
    return out


# ---- the C++/CUDA extension's kernels (cuobjdump / nvdisasm on the built extension) ----------

_PACK_LINES = re.compile(r"__ldg\(reinterpret_cast<const uint4\*>|st\.global\.v4")  # patch_strip.cuh's 16-byte moves


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(_ptxas()), name)  # Triton ships cuobjdump and nvdisasm beside ptxas


def _demangle(names):
    r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return r.stdout.split("\n") if r.returncode == 0 else list(names)


def extension():
    """(path of the built extension, the csrc/ folder beside this package) when the extension
    holds sm_90 device code and its sources are at hand; None otherwise (a CPU-only build)."""
    import glob

    import umae

    so = glob.glob(os.path.join(os.path.dirname(umae.__file__), "_C*.so"))
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))), "csrc")
    if len(so) == 1 and os.path.isdir(csrc) and b"SM_900" in open(so[0], "rb").read():
        return so[0], csrc
    return None


def cuda_audit(so_path: str, csrc: str) -> list[dict]:
    """One row per sm_90 kernel in the extension: registers, spills (stack / local bytes), shared
    memory (static + the strips' dynamic budget), occupancy on an H100 at the block size of its
    __launch_bounds__, and its global accesses through the 16-byte pack helpers (`pack`), with how
    many of those are narrower than 128 bits (the SASS, attributed to source lines by -lineinfo)."""
    strip_src = open(os.path.join(csrc, "cuda", "patch_strip.cuh")).read()
    pack_lines = {i + 1 for i, line in enumerate(strip_src.splitlines()) if _PACK_LINES.search(line)}
    dyn = eval(re.search(r"kStripBytes = ([\d *]+);", strip_src).group(1))  # noqa: S307 (an int product)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([_tool("cuobjdump"), "-xelf", "all", os.path.abspath(so_path)], cwd=d, check=True,
                       capture_output=True)
        for cubin in sorted(f for f in os.listdir(d) if f.endswith(".sm_90.cubin")):
            path = os.path.join(d, cubin)
            usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                                   text=True, check=True).stdout
            elf = subprocess.run([_tool("cuobjdump"), "-elf", path], capture_output=True, text=True).stdout
            threads = {int(v, 16) for v in re.findall(r"EIATTR_MAX_THREADS\s+Format:\s+\S+\s+Value:\s+(0x[0-9a-f]+)", elf)}
            assert len(threads) == 1, (cubin, threads)  # every kernel of a file has the same launch bounds
            warps = threads.pop() // 32
            # -gi: each instruction's source line with the chain of lines it was inlined at
            sass = subprocess.run([_tool("nvdisasm"), "-gi", "-c", path], capture_output=True, text=True,
                                  check=True).stdout
            access = {}
            fn, chain = None, set()
            for line in sass.splitlines():
                m = re.match(r"\.text\.(\S+):", line)
                if m:
                    fn, chain = m.group(1), set()
                    access[fn] = []
                    continue
                if line.lstrip().startswith("//## File"):
                    chain |= {(os.path.basename(f), int(n)) for f, n in re.findall(r'"([^"]+)", line (\d+)', line)}
                    continue
                m = re.search(r"\b(LDG|STG)\.E((?:\.\w+)*)", line)
                if m and fn:
                    width = re.search(r"\.(128|64|U16|S16|U8|S8)\b", m.group(2))
                    bits = {"128": 128, "64": 64}.get(width.group(1), 16) if width else 32
                    access[fn].append((bits, any(f == "patch_strip.cuh" and n in pack_lines for f, n in chain)))
                if re.search(r"/\*[0-9a-f]{4}\*/", line):
                    chain = set()
            for mangled, regs, stack, shared, local in re.findall(
                    r"Function (\S+):\s+REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage):
                smem = int(shared) + dyn
                blocks, occ = occupancy(int(regs), warps, smem)
                packs = [b for b, is_pack in access.get(mangled, []) if is_pack]
                rows.append(dict(mangled=mangled, regs=int(regs), warps=warps, spill=int(stack) + int(local),
                                 smem=smem, blocks_per_sm=blocks, occupancy=occ,
                                 pack=len(packs), pack_narrow=sum(b != 128 for b in packs)))
    for r, name in zip(rows, _demangle([r["mangled"] for r in rows])):
        r["name"] = re.sub(r"^void |umae::\(anonymous namespace\)::|c10::|umae::strip::", "", name).split("(")[0]
    return rows


_PTX_INSTR = re.compile(r"^(?:@!?%\w+\s+)?([a-z][\w.]*)\s*(.*)$")


def shared_addresses_used_as_global(ptx: str) -> list[str]:
    """The global loads / stores (`ld.global*`, `st.global*`) of each PTX function whose address
    derives from a shared-memory symbol: they fault on the GPU (cudaErrorInvalidAddressSpace),
    yet compile, pass the interpreter-free CPU build, and look like any 128-bit access in SASS.
    Taint from the .shared symbols through every instruction's operands to its destination
    (predicates and loaded values excepted), to a fixed point over the function's loops."""
    shared = set(re.findall(r"\.shared\s+(?:\.align\s+\d+\s+)?\.\w+\s+([\w$]+)", ptx))
    out = []
    for fn, body in re.findall(r"\.entry\s+([\w$]+)\s*\((.*?)\n\}", ptx, re.S):
        instrs = []
        for line in body.splitlines():  # statements, out of their `{ .reg ...; ... }` scopes
            for stmt in line.split("//")[0].split(";"):
                m = _PTX_INSTR.match(stmt.strip().lstrip("{").strip().removeprefix("}").strip())
                if not m:
                    continue
                ops = [o.strip() for o in re.split(r",(?![^{]*\})", m.group(2))]
                instrs.append((m.group(1), ops))
        tainted: set[str] = set()
        while True:
            before = len(tainted)
            for op, ops in instrs:
                if op.startswith(("st.", "ld.", "setp", "bra", "bar", "ret", "atom", "red")) or len(ops) < 2:
                    continue
                srcs = " ".join(ops[1:])
                if set(re.findall(r"%\w+", srcs)) & tainted or set(re.findall(r"[\w$]+", srcs)) & shared:
                    tainted |= {r for r in re.findall(r"%\w+", ops[0]) if not r.startswith("%p")}
            if len(tainted) == before:
                break
        for op, ops in instrs:
            if re.match(r"(ld|st)\.global", op):
                addr = next((o for o in ops if o.startswith("[")), "")
                if set(re.findall(r"%\w+", addr)) & tainted:
                    out.append(f"{fn}: {op} {addr}")
    return out


def extension_ptx(so_path: str) -> str:
    """The PTX the extension embeds (setup.py builds its last arch '+PTX')."""
    return subprocess.run([_tool("cuobjdump"), "-ptx", os.path.abspath(so_path)], capture_output=True, text=True,
                          check=True).stdout


def cuda_problems(row) -> list[str]:
    """What the audit requires of a CUDA kernel of the extension and this row does not hold."""
    spill = f"{row['spill']} bytes of stack / local memory" if row["spill"] else ""
    out = _resource_problems(spill, row["smem"], row["occupancy"])
    if row["pack_narrow"]:
        out.append(f"{row['pack_narrow']} of {row['pack']} 16-byte pack accesses compiled narrower")
    return out


def format_cuda_rows(rows) -> str:
    head = f"{'kernel':<60} {'warps':>5} {'regs':>5} {'spill':>5} {'smem':>6} {'blk/SM':>6} {'occup':>6} {'128-bit packs':>13}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name'][:60]:<60} {r['warps']:>5} {r['regs']:>5} {r['spill']:>5} {r['smem']:>6} "
                     f"{r['blocks_per_sm']:>6} {r['occupancy']:>6.0%} {r['pack'] - r['pack_narrow']:>6}/{r['pack']:<6}")
    return "\n".join(lines)
