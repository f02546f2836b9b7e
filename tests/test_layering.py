"""Package layering (issue 22): BUILD's py_library `deps` are the allowed arrows between our
packages, and this test holds the source to them.

`check_layering(root)` reads `root/BUILD`, walks every package folder under `root`, parses each
.py file with `ast` (module-level and nested `import x`, `from x import y`, relative imports
resolved against the file's package, and `importlib.import_module("x")` / `__import__("x")` with a
literal name) and reports:
  * forbidden arrows: an import of one of our packages that the importing target's BUILD deps
    don't declare, as `file:line: pkgA -> pkgB (import text)`;
  * cycles in the package graph the imports actually form, and in the graph BUILD declares
    (found by a DFS, reported as a path `a -> b -> a`);
  * library deps BUILD declares that no import needs (BUILD lists the real deps, not a superset);
  * relative imports that climb above a top-level package.
Our packages are the top-level folders; a file belongs to the rule whose srcs list it, or else
to the py_library of its folder. Anything else (jax, numpy, stdlib, ...) is third-party.

LAYER_RULES pins BUILD's library deps to the layering issue 22 decided, so loosening a layer
takes a deliberate edit here as well as in BUILD.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import shutil
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Issue 22: what each library may import besides itself and third-party code. None: anything.
LAYER_RULES: dict[str, set[str] | None] = {
    "engine": {"models", "compression", "checkpoints_convert", "pallas_kernels"},
    "compression": {"models", "pallas_kernels"},
    "checkpoints_convert": {"models", "pallas_kernels"},
    "models": {"pallas_kernels"},
    "pallas_kernels": set(),
    "benchmarks": None,
    "test_support": None,
}


# ---------------------------------------------------------------------------------------------
# BUILD


@dataclasses.dataclass
class Rule:
    name: str
    kind: str
    srcs: list[str]
    deps: list[str]


def read_build(root: str) -> dict[str, Rule]:
    """Every rule in root/BUILD. BUILD is Starlark, which this subset of it shares with Python:
    run it with the rule functions stubbed so `deps = ALL` and the like evaluate as Bazel would."""
    rules: dict[str, Rule] = {}

    def rule(kind):
        def record(name, srcs=(), deps=(), **_):
            assert name not in rules, f"BUILD: duplicate rule {name}"
            labels = [d[1:] if d.startswith(":") else d for d in deps]
            rules[name] = Rule(name, kind, list(srcs), labels)
        return record

    with open(os.path.join(root, "BUILD")) as f:
        source = f.read()
    namespace = {"__builtins__": {}, "package": lambda **_: None,
                 "py_library": rule("py_library"), "py_test": rule("py_test"),
                 "py_binary": rule("py_binary")}
    exec(compile(source, os.path.join(root, "BUILD"), "exec"), namespace)
    return rules


def folder_libraries(rules: dict[str, Rule]) -> dict[str, str]:
    """Top-level folder -> the py_library of that package (tests -> test_support)."""
    owners: dict[str, str] = {}
    for rule in rules.values():
        if rule.kind != "py_library":
            continue
        for folder in {src.split("/")[0] for src in rule.srcs if "/" in src} or {rule.name}:
            assert owners.setdefault(folder, rule.name) == rule.name, \
                f"BUILD: folder {folder}/ is split between {owners[folder]} and {rule.name}"
    return owners


# ---------------------------------------------------------------------------------------------
# Imports


@dataclasses.dataclass(frozen=True)
class Arrow:
    path: str     # file, relative to the root
    line: int
    source: str   # BUILD rule the file belongs to
    target: str   # package (py_library) it imports
    text: str     # the import statement

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.source} -> {self.target} ({self.text})"


def package_files(root: str, folders: set[str]) -> list[str]:
    """Every .py file under the package folders (each given folder and each top-level folder
    with an __init__.py), relative to root."""
    tops = set(folders)
    for name in os.listdir(root):
        if os.path.isfile(os.path.join(root, name, "__init__.py")):
            tops.add(name)
    found = []
    for top in sorted(tops):
        for directory, subdirs, names in os.walk(os.path.join(root, top)):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith((".", "__pycache__")))
            found += [os.path.relpath(os.path.join(directory, n), root).replace(os.sep, "/")
                      for n in sorted(names) if n.endswith(".py")]
    return found


def imported_modules(path: str, tree: ast.Module) -> list[tuple[ast.AST, str | None]]:
    """(node, absolute dotted module) for every import in the file, at any depth; the module is
    None for a relative import that climbs above its top-level package."""
    package = path.split("/")[:-1]   # a module's package; __init__.py is its package's own
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node, node.module))
                continue
            if node.level > len(package):
                found.append((node, None))
                continue
            base = package[:len(package) - node.level + 1]
            if node.module:
                found.append((node, ".".join(base + [node.module])))
            else:
                found += [(node, ".".join(base + [alias.name])) for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Name)
                    and node.func.id in ("__import__", "import_module"))
                   or (isinstance(node.func, ast.Attribute)
                       and node.func.attr == "import_module"))):
            if not node.args[0].value.startswith("."):
                found.append((node, node.args[0].value))
    return found


# ---------------------------------------------------------------------------------------------
# Graphs


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """A cycle path [a, b, ..., a] for every back edge a depth-first search meets (none: acyclic).
    Self edges are a package importing itself and are ignored."""
    state: dict[str, str] = {}   # absent: unvisited, "open": on the stack, "done"
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == node:
                continue
            if state.get(nxt) == "open":
                loop = stack[stack.index(nxt):]
                start = loop.index(min(loop))   # the same cycle reads the same whichever
                loop = loop[start:] + loop[:start]   # node the search entered it by
                cycles.append(loop + [loop[0]])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


@dataclasses.dataclass
class Layering:
    rules: dict[str, Rule]
    files: list[str]
    arrows: list[Arrow]           # every import of one of our packages from another
    forbidden: list[Arrow]        # ... that the importing rule's deps don't declare
    bad_relative: list[str]       # relative imports above a top-level package
    import_cycles: list[list[str]]
    declared_cycles: list[list[str]]
    unused_deps: list[str]        # "lib -> dep" declared by a py_library, needed by no import
    package_of: dict[str, str]    # file -> the package (py_library) of its folder

    def import_graph(self) -> dict[str, set[str]]:
        """BUILD rule -> packages its files import (a py_test is its own node: nothing imports
        it, since an import of tests/... lands on test_support, the tests/ package)."""
        graph: dict[str, set[str]] = {}
        for arrow in self.arrows:
            graph.setdefault(arrow.source, set()).add(arrow.target)
        return graph

    def problems(self) -> list[str]:
        return ([f"{a}  [not in BUILD deps of {a.source}]" for a in self.forbidden]
                + self.bad_relative
                + [f"import cycle: {' -> '.join(c)}" for c in self.import_cycles]
                + [f"BUILD deps cycle: {' -> '.join(c)}" for c in self.declared_cycles]
                + [f"BUILD declares {d} but no import needs it" for d in self.unused_deps])


def check_layering(root: str) -> Layering:
    """Check the imports of the tree at root against root/BUILD (see the module docstring)."""
    rules = read_build(root)
    libraries = folder_libraries(rules)
    owner_of_src = {src: rule.name for rule in rules.values() for src in rule.srcs}
    files = package_files(root, set(libraries))
    arrows, bad_relative, package_of = [], [], {}
    for path in files:
        with open(os.path.join(root, path)) as f:
            source = f.read()
        tree = ast.parse(source, filename=path)
        top = path.split("/")[0]
        package_of[path] = libraries.get(top, top)
        rule = owner_of_src.get(path, package_of[path])
        for node, module in imported_modules(path, tree):
            text = " ".join((ast.get_source_segment(source, node) or "").split())
            if module is None:
                bad_relative.append(f"{path}:{node.lineno}: relative import above the top-level "
                                    f"package ({text})")
                continue
            imported = module.split(".")[0]
            ours = imported in libraries or os.path.isfile(
                os.path.join(root, imported, "__init__.py"))
            if not ours:
                continue   # third-party or the standard library
            target = libraries.get(imported, imported)
            if target != package_of[path]:
                arrows.append(Arrow(path, node.lineno, rule, target, text))
    arrows.sort(key=lambda a: (a.path, a.line, a.target))
    declared = {name: set(rule.deps) for name, rule in rules.items()}
    forbidden = [a for a in arrows if a.target not in declared.get(a.source, set())]
    needed: dict[str, set[str]] = {}
    for a in arrows:
        needed.setdefault(a.source, set()).add(a.target)
    unused = [f"{name} -> {dep}" for name, rule in sorted(rules.items())
              if rule.kind == "py_library" for dep in rule.deps
              if dep not in needed.get(name, set())]
    layering = Layering(rules, files, arrows, forbidden, bad_relative, [], find_cycles(declared),
                        unused, package_of)
    layering.import_cycles = find_cycles(layering.import_graph())
    return layering


# ---------------------------------------------------------------------------------------------
# The real tree


@pytest.fixture(scope="module")
def real() -> Layering:
    return check_layering(ROOT)


def test_every_import_between_packages_is_declared_in_build(real):
    if real.forbidden or real.bad_relative:
        pytest.fail("imports that BUILD deps (the issue-22 layering) do not allow:\n"
                    + "\n".join([str(a) for a in real.forbidden] + real.bad_relative),
                    pytrace=False)


def test_packages_import_each_other_without_cycles(real):
    if real.import_cycles:
        pytest.fail("package import cycles:\n"
                    + "\n".join(" -> ".join(c) for c in real.import_cycles), pytrace=False)


def test_build_deps_are_acyclic_and_are_the_layer_rules(real):
    assert not real.declared_cycles, real.declared_cycles
    for name, allowed in LAYER_RULES.items():
        rule = real.rules[name]
        assert rule.kind == "py_library", name
        assert name not in rule.deps, f"{name} depends on itself"
        if allowed is None:   # may import anything of ours
            assert set(rule.deps) <= set(LAYER_RULES), (name, rule.deps)
        else:
            assert sorted(rule.deps) == sorted(allowed), name
    libraries = {n for n, r in real.rules.items() if r.kind == "py_library"}
    assert libraries == set(LAYER_RULES)
    all_libraries = sorted(libraries)
    for rule in real.rules.values():
        if rule.kind == "py_test":
            assert sorted(rule.deps) == all_libraries, rule.name


def test_build_lists_only_deps_that_some_import_needs(real):
    assert not real.unused_deps, real.unused_deps


def test_checker_walks_every_package_file(real):
    """No file slips past the scan: every source BUILD lists was parsed (and more, if any)."""
    listed = {src for rule in real.rules.values() for src in rule.srcs}
    assert listed <= set(real.files), sorted(listed - set(real.files))
    assert {a.source for a in real.arrows} >= {"engine", "compression", "checkpoints_convert",
                                               "models", "benchmarks", "test_support"}


def test_real_build_passes_once_the_wrong_way_imports_are_gone(tmp_path, real):
    """Copy the tree, drop the imports the checker flags, check again: BUILD then needs no edit
    (every declared dep still used, nothing else flagged)."""
    folders = {path.split("/")[0] for path in real.files}
    for folder in folders:
        shutil.copytree(os.path.join(ROOT, folder), tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "BUILD"), tmp_path / "BUILD")
    for path in {a.path for a in real.forbidden}:
        lines = (tmp_path / path).read_text().splitlines(keepends=True)
        drop = {a.line for a in real.forbidden if a.path == path}
        for node in ast.walk(ast.parse("".join(lines))):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node.lineno in drop:
                lines[node.lineno - 1] = " " * node.col_offset + "pass\n"
                for i in range(node.lineno, node.end_lineno):
                    lines[i] = "\n"
        (tmp_path / path).write_text("".join(lines))
    fixed = check_layering(str(tmp_path))
    assert fixed.problems() == []
    assert len(fixed.arrows) == len(real.arrows) - len(real.forbidden)


# ---------------------------------------------------------------------------------------------
# The checker on synthetic trees


def make_tree(root, files: dict[str, str], deps: dict[str, set[str]]) -> str:
    """Write files and a BUILD with a py_library per top-level folder (tests/test_*.py: a py_test
    each, depending on every library) whose deps are deps[name]."""
    by_folder: dict[str, list[str]] = {}
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(textwrap.dedent(text))
        by_folder.setdefault(path.split("/")[0], []).append(path)
    names = {folder: "test_support" if folder == "tests" else folder for folder in by_folder}
    build = [f"ALL = {sorted(':' + n for n in names.values())!r}"]
    tests = []
    for folder, paths in sorted(by_folder.items()):
        tests += [p for p in paths if p.startswith("tests/test_")]
        srcs = sorted(p for p in paths if not p.startswith("tests/test_"))
        labels = sorted(":" + d for d in deps.get(names[folder], ()))
        build.append(f"py_library(name = {names[folder]!r}, srcs = {srcs!r}, deps = {labels!r})")
    build += [f"py_test(name = {os.path.basename(p)[:-3]!r}, srcs = [{p!r}], deps = ALL)"
              for p in sorted(tests)]
    (root / "BUILD").write_text("\n".join(build) + "\n")
    return str(root)


CLEAN = {path: textwrap.dedent(text) for path, text in {
    "pallas_kernels/__init__.py": "",
    "pallas_kernels/errors.py": "class UserError(Exception): ...\n",
    "pallas_kernels/kv_packing.py": """\
        import jax.numpy as jnp
        from .errors import UserError
        """,
    "models/__init__.py": "",
    "models/config.py": "from pallas_kernels.errors import UserError\n",
    "models/llama.py": """\
        import random
        from . import config
        from .config import UserError
        """,
    "compression/__init__.py": "",
    "compression/random.py": "import random\n",   # the stdlib, not compression.random
    "compression/compress.py": """\
        from models.config import UserError
        def pack():
            from pallas_kernels import kv_packing
            return kv_packing
        """,
    "checkpoints_convert/__init__.py": "",
    "checkpoints_convert/load.py": """\
        import models.config
        import pallas_kernels.errors as errors
        """,
    "engine/__init__.py": "",
    "engine/generation.py": """\
        from compression.compress import pack
        from models import llama
        from checkpoints_convert.load import (
            models)
        try:
            import pallas_kernels.kv_packing
        except ImportError:
            pass
        """,
    "engine/sub/__init__.py": "",
    "engine/sub/deep.py": "from ..generation import pack\nfrom .. import generation\n",
    "benchmarks/__init__.py": "",
    "benchmarks/bench.py": "from engine.generation import pack\nfrom tests.helper import x\n",
    "tests/__init__.py": "",
    "tests/helper.py": "from models.config import UserError\nx = 1\n",
    "tests/test_thing.py": """\
        from benchmarks.bench import pack
        from tests.helper import x
        import engine, models, compression, checkpoints_convert, pallas_kernels
        """,
}.items()}
CLEAN_DEPS = {name: allowed for name, allowed in LAYER_RULES.items() if allowed is not None}
CLEAN_DEPS |= {"benchmarks": {"engine", "test_support"}, "test_support": {"models"}}


def test_a_clean_synthetic_tree_passes(tmp_path):
    layering = check_layering(make_tree(tmp_path, CLEAN, CLEAN_DEPS))
    assert layering.problems() == []
    arrows = {(a.path, a.line, a.target) for a in layering.arrows}
    assert ("engine/generation.py", 3, "checkpoints_convert") in arrows   # multi-line import
    assert ("engine/generation.py", 6, "pallas_kernels") in arrows        # inside try
    assert ("compression/compress.py", 3, "pallas_kernels") in arrows     # inside a function
    assert not any(a.path == "engine/sub/deep.py" for a in layering.arrows)  # relative, own pkg
    graph = layering.import_graph()
    assert graph["test_support"] == {"models"}
    assert graph["test_thing"] == {"benchmarks", "engine", "models", "compression",
                                   "checkpoints_convert", "pallas_kernels"}


def test_planted_forbidden_imports_are_reported(tmp_path):
    planted = dict(CLEAN)
    planted["models/x.py"] = "from engine.generation import generate\n"   # not in BUILD srcs
    planted["compression/base.py"] = """\
        import numpy

        def helper():
            import checkpoints_convert.load as load
            return load
        """
    planted["pallas_kernels/errors.py"] = """\
        import importlib
        from models import (config,
                            llama)
        kernel = importlib.import_module("compression.compress")
        """
    planted["checkpoints_convert/load.py"] += "from ..engine import generation\n"
    layering = check_layering(make_tree(tmp_path, planted, CLEAN_DEPS))
    assert [str(a) for a in layering.forbidden] == [
        "compression/base.py:4: compression -> checkpoints_convert "
        "(import checkpoints_convert.load as load)",
        "models/x.py:1: models -> engine (from engine.generation import generate)",
        "pallas_kernels/errors.py:2: pallas_kernels -> models (from models import (config, llama))",
        'pallas_kernels/errors.py:4: pallas_kernels -> compression '
        '(importlib.import_module("compression.compress"))',
    ]
    assert layering.bad_relative == [
        "checkpoints_convert/load.py:3: relative import above the top-level package "
        "(from ..engine import generation)"]
    # The wrong-way arrows close cycles; each back edge of the search reports one, as a path.
    assert ["models", "pallas_kernels", "models"] in layering.import_cycles
    assert any({"engine", "models"} <= set(c) and c[0] == c[-1] for c in layering.import_cycles)
    assert layering.declared_cycles == []


def test_a_planted_cycle_is_reported_with_its_path(tmp_path):
    """BUILD that declares models <-> compression and files that import both ways: no arrow is
    undeclared, yet both the import graph and the declared graph have the cycle."""
    planted = dict(CLEAN)
    planted["models/llama.py"] += "from compression.compress import pack\n"
    deps = dict(CLEAN_DEPS)
    deps["models"] = {"pallas_kernels", "compression"}
    layering = check_layering(make_tree(tmp_path, planted, deps))
    assert layering.forbidden == []
    assert layering.import_cycles == [["compression", "models", "compression"]]
    assert layering.declared_cycles == [["compression", "models", "compression"]]
    assert "import cycle: compression -> models -> compression" in layering.problems()


def test_find_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"a", "b"}, "b": set()}) == []
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"x": {"y"}, "y": {"x", "z"}, "z": {"y"}}) == [["x", "y", "x"],
                                                                      ["y", "z", "y"]]


if __name__ == "__main__":   # python tests/test_layering.py [root]: the problems, one a line
    import sys
    found = check_layering(sys.argv[1] if len(sys.argv) > 1 else ROOT).problems()
    print("\n".join(found) or "layering OK")
    sys.exit(1 if found else 0)
