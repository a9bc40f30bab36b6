"""The test tiers: the sampled parity grids keep their coverage in the quick tier, and what spawns
processes or compiles for sm_90 is out of it."""
import ast
import glob
import itertools
import os
import tomllib

import pytest
from umae_testing import sampled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(mark):
    """(values, is_quick) of a sampled parametrize mark."""
    return [(p.values, not any(m.name == "slow" for m in p.marks)) for p in mark.args[1]]


def test_sampled_grid_quick_covers_every_key_and_value_and_full_crosses():
    impls = [pytest.param("cpu", "cpp", id="cpu-cpp"), pytest.param("cpu", "tri", id="cpu-tri")]
    mark = sampled(key={"device,impl": impls, "dtype": ["f32", "bf16", "f16"]},
                   crossed={"B,D": [(1, 16), (7, 1000), (255, 16), (300, 257)]},
                   paired={"excl": [False, True], "norm": [True, False]})
    assert mark.args[0] == "device,impl,dtype,B,D,excl,norm"
    rows = _rows(mark)
    full = {v[:5] for v, _ in rows}
    assert len(rows) == len(full) == 2 * 3 * 4  # implementation x dtype x shape, each once
    quick = [v for v, q in rows if q]
    assert {v[:3] for v in quick} == set(itertools.product(("cpu",), ("cpp", "tri"), ("f32", "bf16", "f16")))
    assert {v[3:5] for v in quick} == {(1, 16), (7, 1000), (255, 16), (300, 257)}
    assert len(quick) == 6
    # each implementation x dtype, and each shape, meets every flag combination in the full run
    flags = set(itertools.product((False, True), (True, False)))
    for key in itertools.product(("cpu",), ("cpp", "tri"), ("f32", "bf16", "f16")):
        assert {v[5:] for v, _ in rows if v[:3] == key} == flags, key
    for shape in ((1, 16), (7, 1000), (255, 16), (300, 257)):
        assert {v[5:] for v, _ in rows if v[3:5] == shape} == flags, shape


def test_sampled_grid_pairs_every_flag_with_every_shape_when_counts_share_a_factor():
    # 6 shapes, 2 flag values: a pairing by row index alone gave each shape one value for ever
    mark = sampled(key={"impl": ["a", "b", "c", "d", "e", "f"], "dtype": ["f32", "bf16", "f16"]},
                   crossed={"L": [49, 196, 197, 256, 1024, 37]}, paired={"has_cls": [True, False]})
    rows = _rows(mark)
    for L in (49, 196, 197, 256, 1024, 37):
        assert {v[3] for v, _ in rows if v[2] == L} == {True, False}, L
    assert sampled(key={"impl": []}, crossed={"L": [1]}).args[1] == []  # no implementation: nothing, no error


def test_the_default_run_is_the_quick_tier():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        cfg = tomllib.load(f)["tool"]["pytest"]["ini_options"]
    assert "-m 'not slow and not dist and not gpucheck'" in cfg["addopts"]
    assert {m.split(":")[0] for m in cfg["markers"]} == {"slow", "dist", "gpucheck"}


def _marks(fn: ast.FunctionDef, module_marks: set) -> set:
    out = set(module_marks)
    for d in fn.decorator_list:
        node = d.func if isinstance(d, ast.Call) else d
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "mark":
            out.add(node.attr)
    return out


def tier_problems(path: str) -> list[str]:
    """Tests of the file at `path` out of their tier, read from the source: a test that calls
    these (itself, or through a helper of its module) spawns processes and must be `dist`; one
    that compiles the Triton kernels for sm_90 (umae.verify.jit.compile_all, directly or in a script
    it runs) or runs scripts/gpu_check.sh must be `gpucheck`."""
    spawn = {"start_processes", "Process", "spawn"}
    tree = ast.parse(open(path).read())
    module_marks, strings = set(), {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if getattr(t, "id", "") == "pytestmark":
                    module_marks |= {n.attr for n in ast.walk(node.value) if isinstance(n, ast.Attribute)}
                elif isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                    strings[getattr(t, "id", "")] = node.value.value
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}

    def reach(fn, seen=()):
        """(the call names, the source and module-level strings) of fn and of the module helpers
        it calls, recursively."""
        names = {(c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", ""))
                 for c in ast.walk(fn) if isinstance(c, ast.Call)}
        used = [strings[n.id] for n in ast.walk(fn) if isinstance(n, ast.Name) and n.id in strings]
        text = ast.unparse(fn) + "".join(used)
        for name in list(names):
            if name in funcs and name not in seen and not name.startswith("test_"):
                more, more_text = reach(funcs[name], seen + (name,))
                names, text = names | more, text + more_text
        return names, text

    bad = []
    for name, fn in funcs.items():
        if not name.startswith("test_"):
            continue
        (called, src), marks = reach(fn), _marks(fn, module_marks)
        where = f"{os.path.basename(path)}::{name}"
        if called & spawn and "dist" not in marks:
            bad.append(f"{where} spawns processes but is not marked dist")
        if ("compile_all(" in src or "gpu_check.sh" in src) and "gpucheck" not in marks:
            bad.append(f"{where} is a GPU-machine check but is not marked gpucheck")
    return bad


def test_what_spawns_processes_is_dist_and_what_compiles_for_sm90_is_gpucheck():
    paths = sorted(set(glob.glob(os.path.join(ROOT, "tests", "test_*.py"))) - {os.path.abspath(__file__)})
    bad = [p for path in paths for p in tier_problems(path)]
    assert not bad, "\n".join(bad)


def test_tier_problems_sees_an_unmarked_spawn_and_compile(tmp_path):
    src = tmp_path / "test_planted.py"
    src.write_text('''import pytest
SCRIPT = "for k in jit.compile_all(x): pass"


def _helper():
    mp.start_processes(f, nprocs=2)


def test_spawns():
    _helper()


@pytest.mark.dist
def test_spawns_marked():
    _helper()


def test_compiles():
    subprocess.run([sys.executable, "-c", SCRIPT])
''')
    assert tier_problems(str(src)) == [
        "test_planted.py::test_spawns spawns processes but is not marked dist",
        "test_planted.py::test_compiles is a GPU-machine check but is not marked gpucheck"]
