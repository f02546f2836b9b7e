"""BUILD declares every source file: a py_library per package listing all its modules and a
py_test per test file, so Bazel users build exactly the tree."""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ["engine", "models", "compression", "pallas_kernels", "checkpoints_convert",
            "benchmarks"]


def rules() -> dict[str, tuple[str, list[str]]]:
    """name -> (kind, srcs) of every rule in BUILD."""
    with open(os.path.join(ROOT, "BUILD")) as f:
        text = f.read()
    found = {}
    for kind, body in re.findall(r"^(py_\w+)\((.*?)^\)", text, re.S | re.M):
        name = re.search(r'name\s*=\s*"([^"]+)"', body).group(1)
        srcs = ast.literal_eval(re.search(r"srcs\s*=\s*(\[.*?\])", body, re.S).group(1))
        found[name] = (kind, srcs)
    return found


def python_files(folder: str) -> list[str]:
    return sorted(f"{folder}/{name}" for name in os.listdir(os.path.join(ROOT, folder))
                  if name.endswith(".py"))


def test_every_package_module_is_in_its_library():
    declared = rules()
    for package in PACKAGES:
        kind, srcs = declared[package]
        assert kind == "py_library"
        assert sorted(srcs) == python_files(package), package


def test_every_test_file_has_a_py_test_and_helpers_a_library():
    declared = rules()
    tests = [f for f in python_files("tests") if os.path.basename(f).startswith("test_")]
    for path in tests:
        name = os.path.basename(path)[:-3]
        assert declared[name] == ("py_test", [path]), name
    helpers = [f for f in python_files("tests") if f not in tests]
    assert sorted(declared["test_support"][1]) == helpers
