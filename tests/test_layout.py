"""The code's shape, checked from its imports: the folders are the layers (kernels, the op library,
the models, the data, training, the research tools, the benchmarks, the CLI), every import runs
down them, kernels/ imports nothing of umae, no circle; the longest chain of folders importing
one another (the floors the imports make) at most 6."""
import ast
import glob
import os
import re

from umae_testing import OP_TESTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the floors, lowest first: a module may import its own floor's and lower floors' modules only
LAYERS = [
    ("kernels", ["umae.kernels"]),  # Triton kernels (kernels/), nothing of umae
    ("ops", ["umae.ops", "umae._C"]),  # the op library: the switch, each op's module, the registry, the C++ extension
    ("models", ["umae", "umae.models", "umae._mae", "umae.patching", "umae.convert", "umae._files", "umae._table",
                "umae.runtime"]),  # the public package: MAE models, umae.patch, checkpoint conversion, file helpers
    ("data", ["umae.data"]),  # the input pipeline and the generated data sets
    ("train", ["umae.train"]),
    ("research", ["umae.research"]),  # evaluate, sweep, reproduce: one app calling another
    ("bench", ["umae.bench"]),  # the benchmark: timed ops and steps, and the other measurements
    ("verify", ["umae.verify"]),  # umae check, umae info, the sm_90 compile, the static audit, counted traffic
    ("cli", ["umae.cli"]),
]
MAX_FLOORS = 9  # declared; the floors the imports make are fewer (test_at_most_six_floors_from_the_imports)

EXTENSIONS = {"umae._C"}  # compiled, no .py file


def modules() -> dict:
    """{module name: file} of umae/ and kernels/ (umae.kernels)."""
    out = {}
    for folder, pkg in (("umae", "umae"), ("kernels", "umae.kernels")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, folder))[:-3]
                    parts = [p for p in rel.split(os.sep) if p != "__init__"]
                    out[".".join([pkg, *parts])] = os.path.join(dirpath, f)
    return out


def imports(name: str, path: str, known: dict) -> set:
    """The umae modules `name` imports (a `from pkg import sub` counts as sub, not pkg)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("umae")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + path.endswith("__init__.py")]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("umae"):
                continue
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in set(known) | EXTENSIONS}
            found |= subs or {target}
    return found - {name}


def layer(mod: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{mod}: in no layer of tests/test_layout.py"
    return best[0]


def test_the_floors_are_folders():
    # each floor is one folder of umae/ (the models floor: the package's own files and umae/models/)
    assert len(LAYERS) <= MAX_FLOORS
    for mod in modules():
        name, prefixes = LAYERS[layer(mod)]
        top = mod.split(".")[1] if mod.count(".") else ""
        if name != "models":
            assert os.path.isdir(os.path.join(ROOT, "umae", name)) and top == name, (mod, name)
        else:
            assert top in ("", "models") or os.path.isfile(os.path.join(ROOT, "umae", top + ".py")), mod


def test_setup_installs_every_package():
    # a package missing from setup.py's list works in the editable install and is absent from a wheel
    src = open(os.path.join(ROOT, "setup.py")).read()
    listed = set(re.findall(r'"(umae(?:\.\w+)?)"', src[src.index("packages="):src.index("ext_modules=")]))
    found = {"umae." + os.path.basename(d) if d != os.path.join(ROOT, "umae") else "umae"
             for d in glob.glob(os.path.join(ROOT, "umae", "**", "__init__.py"), recursive=True) for d in [os.path.dirname(d)]}
    assert found | {"umae.kernels"} == listed, (found, listed)


def test_imports_run_down_the_layers():
    known = modules()
    up = []
    for mod, path in sorted(known.items()):
        for dep in sorted(imports(mod, path, known)):
            if layer(dep) > layer(mod):
                up.append(f"{mod} ({LAYERS[layer(mod)][0]}) imports {dep} ({LAYERS[layer(dep)][0]})")
    assert not up, "imports back up the layers:\n" + "\n".join(up)


def _floor_of_folder(mod: str) -> str:
    return LAYERS[layer(mod)][0]


def floors_from_imports() -> tuple[int, list[str]]:
    """The floors the imports make: the longest chain of folders each importing the next (the CLI's
    subcommand modules, imported by name, count as its imports); (its length, the chain)."""
    import functools

    from umae.cli.main import COMMANDS

    known = modules()
    deps: dict[str, set] = {}
    for mod, path in known.items():
        found = imports(mod, path, known) | (set(COMMANDS.values()) if mod == "umae.cli.main" else set())
        deps.setdefault(_floor_of_folder(mod), set()).update(
            f for f in map(_floor_of_folder, found) if f != _floor_of_folder(mod))

    @functools.lru_cache(maxsize=None)
    def chain(folder: str) -> tuple:
        return (folder,) + max((chain(d) for d in deps.get(folder, ())), key=len, default=())
    longest = max((chain(f) for f in deps), key=len)
    return len(longest), list(longest)


def test_at_most_six_floors_from_the_imports():
    n, longest = floors_from_imports()
    assert n <= 6, f"{n} floors: {' -> '.join(longest)}"


def test_kernels_import_nothing_of_umae():
    known = modules()
    bad = {m: sorted(d for d in imports(m, p, known) if not d.startswith("umae.kernels"))
           for m, p in known.items() if m.startswith("umae.kernels")}
    assert not any(bad.values()), bad


def test_no_import_circle():
    known = modules()
    graph = {m: {d for d in imports(m, p, known) if d in known} for m, p in known.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


def test_the_checker_sees_an_import_back_up(tmp_path):
    # what kernels/_util.py once had: a relative import of the ops' helpers (then umae.ops._backend) from a kernel module
    src = tmp_path / "fake.py"
    src.write_text("from ..ops._common import triton_interpreted\nfrom . import _util\nimport umae.ops\n")
    known = modules()
    found = imports("umae.kernels.fake", str(src), known)
    assert found == {"umae.ops._common", "umae.kernels._util", "umae.ops"}, found
    assert layer("umae.ops._common") > layer("umae.kernels.fake") and layer("umae.models") > layer("umae.ops._common")


def _schema_pattern(op):
    """A C++/CUDA line defining one of op's schemas or registering a kernel for it (its forward, its
    `_backward` / `_with_grad`, the Triton launchers' names)."""
    names = {op.schema.split("::")[1]} | set(op.triton_kernels or ())
    return re.compile(r'm\.(def|impl)\("(%s)(_backward|_with_grad)?[("]' % "|".join(map(re.escape, names)))


def _op_files(op, roots=(ROOT,)) -> set:
    """The files holding op's faces, found from its registry entry: its functions' and kernels'
    modules, the C++/CUDA files that define its schemas or register kernels for them, its
    benchmark case, its tests, and any file of umae/, kernels/ or csrc/ that names the op in quotes
    (a branch on its name elsewhere would be a face to edit too)."""
    import inspect
    import re

    from umae.bench.cases import CASES

    files = {inspect.getsourcefile(f) for f in (op.public, op.reference, op.fused, CASES[op.name])}
    files.add(os.path.join(ROOT, OP_TESTS[op.name]))
    if op.kernels is not None:
        files.add(inspect.getsourcefile(op.kernels))
    schema = _schema_pattern(op)
    quoted = re.compile("[\"']%s[\"']" % re.escape(op.name))
    for folder in (os.path.join(r, d) for r in roots for d in ("umae", "kernels", "csrc")):
        for dirpath, _, fs in os.walk(folder):
            for f in fs:
                if f.endswith((".py", ".cpp", ".cu", ".h", ".cuh")):
                    path = os.path.join(dirpath, f)
                    text = open(path).read()
                    if schema.search(text) or (quoted.search(text) and not path.endswith("registry.py")):
                        files.add(path)
    return {os.path.relpath(os.path.realpath(p), ROOT) for p in files}


def test_an_op_lives_in_five_files():
    from umae.ops import registry

    for name, op in registry.OPS.items():
        files = _op_files(op)
        assert len(files) <= 5, f"{name} lives in {len(files)} files: {sorted(files)}"
        assert f"umae/ops/{op.public.__module__.split('.')[-1]}.py" in files, name


def _reading_path(op, roots=(ROOT,)) -> set:
    """The files a reader opens following op from `umae.<op>` to its CPU and GPU kernels and its
    backward: the module of its public function and every module whose names its public and fused
    functions call; the C++/CUDA files that define its schemas or register kernels for them, with the
    headers they include; its Triton kernel module with the modules it imports."""
    import inspect
    import types

    files = set()
    for fn in (op.public, op.fused):
        files.add(inspect.getsourcefile(fn))
        for name in fn.__code__.co_names:
            obj = fn.__globals__.get(name)
            if isinstance(obj, types.ModuleType) and obj.__name__.startswith("umae."):
                files.add(obj.__file__)
            elif callable(obj) and getattr(obj, "__module__", "").startswith("umae."):
                files.add(inspect.getsourcefile(inspect.unwrap(obj)))
    if op.kernels is not None:
        files.add(inspect.getsourcefile(op.kernels))
        tree = ast.parse(open(inspect.getsourcefile(op.kernels)).read())
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.level == 1:
                files.add(os.path.join(os.path.dirname(op.kernels.__file__), f"{n.module}.py"))
    schema = _schema_pattern(op)
    todo = [os.path.join(d, f) for r in roots for d, _, fs in os.walk(os.path.join(r, "csrc")) for f in fs
            if f.endswith((".cpp", ".cu")) and schema.search(open(os.path.join(d, f)).read())]
    while todo:
        path = os.path.realpath(todo.pop())
        if path not in files:
            files.add(path)
            todo += [os.path.join(os.path.dirname(path), inc)
                     for inc in re.findall(r'^#include "([^"]+)"', open(path).read(), re.M)]
    return {os.path.relpath(os.path.realpath(p), ROOT) for p in files}


def test_a_reader_follows_each_op_in_six_files():
    from umae.ops import registry

    for name, op in registry.OPS.items():
        files = _reading_path(op)
        assert len(files) <= 6, f"{name}: {len(files)} files: {sorted(files)}"
        assert {"umae/ops/_common.py", "csrc/common.h"} <= files, (name, sorted(files))  # the walk sees both sides


def test_the_reading_path_follows_a_registration_and_its_includes(tmp_path):
    # the count itself can fail: a CUDA file registering the op is opened, and so is what it includes
    from umae.ops import registry

    op = registry.get("random_masking")
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "probe.cu").write_text('#include "probe.cuh"\n  m.impl("random_masking", &k);\n')
    (tmp_path / "csrc" / "probe.cuh").write_text("// a helper\n")
    added = _reading_path(op, roots=(ROOT, str(tmp_path))) - _reading_path(op)
    assert {os.path.basename(p) for p in added} == {"probe.cu", "probe.cuh"}


def test_op_files_sees_a_branch_on_the_name_and_a_schema(tmp_path):
    # the check itself can fail: a quoted op name or a kernel registration elsewhere is counted
    from umae.ops import registry

    op = registry.get("random_masking")
    (tmp_path / "umae").mkdir()
    (tmp_path / "umae" / "probe.py").write_text('if op_name == "random_masking":\n    pass\n')
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "probe.cu").write_text('  m.impl("random_masking_backward", &k);\n')
    before = _op_files(op)
    after = _op_files(op, roots=(ROOT, str(tmp_path)))
    assert {os.path.basename(p) for p in after - before} == {"probe.py", "probe.cu"}


def test_public_names_are_imported_explicitly():
    # a reader, an IDE and a static walk follow umae.mae_loss to its module: no names built at run time
    from umae.ops import registry

    for path in ("umae/__init__.py", "umae/ops/__init__.py"):
        src = open(os.path.join(ROOT, path)).read()
        assert "globals()" not in src, path
        tree = ast.parse(src)
        imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert set(registry.OPS) <= imported, (path, set(registry.OPS) - imported)


def test_no_issue_numbers_in_the_code():
    # the history lives in git; a comment says why, not which ticket
    import re

    rx = re.compile(r"\b[Ii]ssues? ?#?\d+")
    found = []
    for folder in ("umae", "kernels", "csrc", "tests", "scripts"):
        for dirpath, _, fs in os.walk(os.path.join(ROOT, folder)):
            for f in fs:
                if f.endswith((".py", ".cpp", ".cu", ".h", ".cuh", ".sh")):
                    path = os.path.join(dirpath, f)
                    found += [f"{os.path.relpath(path, ROOT)}:{i}" for i, line in enumerate(open(path), 1)
                              if rx.search(line)]
    assert not found, found
    assert os.path.isfile(os.path.join(ROOT, "LICENSE"))


# ---- every repository path named in comments, docstrings and docs exists ---------------------------------

_PATH = re.compile(r"(?<![\w/.-])((?:umae|kernels|csrc|scripts|tests|docs|bench|\.ci)/[\w./<>*-]*[\w>*/])")


def _named_paths(root: str):
    """(file, path) of each repository path a file of the tree names: `<op>` resolved against the ops'
    module stems, any other `<...>` and `*` as wildcards; `kernels/_util.cast_rn` as the file and a name in it."""
    pats = ("umae/**/*.py", "kernels/*.py", "csrc/**/*.cpp", "csrc/**/*.h", "csrc/**/*.cu", "csrc/**/*.cuh",
            "scripts/*", "tests/*.py", "docs/*.md", "*.md", "bench/*.md", "setup.py", "pyproject.toml")
    for f in sorted({f for p in pats for f in glob.glob(os.path.join(root, p), recursive=True)}):
        for line in _prose(f):
            for m in _PATH.finditer(line):
                if "://" not in line[: m.start()]:  # a URL's path is another repository's
                    yield os.path.relpath(f, root), m.group(1).rstrip(".")


def _prose(path: str) -> list[str]:
    """The lines of a file a reader reads as prose: a Python file's comments and docstrings, any other file whole."""
    text = open(path, errors="replace").read()
    if not path.endswith(".py"):
        return text.splitlines()
    import io
    import tokenize

    out = [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            out += (ast.get_docstring(node, clean=False) or "").splitlines()
    return out


def _exists(root: str, path: str, stems) -> bool:
    cands = [path.replace("<op>", s) for s in stems] if "<op>" in path else [path]
    cands = [re.sub(r"<[^>]+>", "*", c).rstrip("/") for c in cands]
    cands += [c.rsplit(".", 1)[0] + ".py" for c in cands if "." in os.path.basename(c)]  # file.py's name, as file.name
    return any(glob.glob(os.path.join(root, c)) for c in cands)


def test_every_path_named_exists():
    from umae.ops import registry

    stems = {op.public.__module__.split(".")[-1].removesuffix("_op") for op in registry.OPS.values()}
    stale = [f"{f}: {p}" for f, p in _named_paths(ROOT) if not _exists(ROOT, p, stems)]
    assert not stale, "\n".join(stale)


def test_the_path_check_can_fail(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.md").write_text("see umae/ops/<op>_op.py and umae/gone.py, not https://x.org/umae/no.py\n")
    (tmp_path / "umae" / "ops").mkdir(parents=True)
    (tmp_path / "umae" / "ops" / "patchify_op.py").write_text('"""in kernels/gone.py"""\nx = "umae/code.py"  # umae/cut.py\n')
    named = sorted(p for _, p in _named_paths(str(tmp_path)))
    assert named == ["kernels/gone.py", "umae/cut.py", "umae/gone.py", "umae/ops/<op>_op.py"]  # not code's strings
    assert [_exists(str(tmp_path), p, {"patchify"}) for p in named] == [False, False, False, True]
