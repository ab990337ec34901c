"""The architecture as the code shows it: three layers, each importing only those below it; short
functions; a cheap ``import rnnjax``; the public API."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import rnnjax

PACKAGE = Path(rnnjax.__file__).parent
LAYERS = {"core": 0, "training": 1, "app": 2}


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text())


def layer_of(module: str) -> int | None:
    """The layer of ``rnnjax.<layer>...``; None for the top level (``rnnjax``, ``__main__``)."""
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def imports(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rnnjax"):
            yield node.module, node.lineno
        elif isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names if alias.name.startswith("rnnjax"))


def test_every_module_lies_in_one_of_three_layers_and_imports_only_those_below():
    climbs = []
    for path, tree in modules():
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(relative.parts).removesuffix(".__init__")
        own = layer_of(module)
        if own is None:
            assert module in ("rnnjax", "rnnjax.__main__"), module
            continue
        for imported, line in imports(tree):
            other = layer_of(imported)
            if other is not None and other > own:
                climbs.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported}")
    assert climbs == []


def code_lines(node: ast.FunctionDef, source: list[str]) -> int:
    """Lines of code of a function: its docstring, comments and blank lines not counted."""
    body = node.body
    docstring = set()
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
        docstring = set(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(1 for number in range(node.lineno, node.end_lineno + 1)
               if number not in docstring and source[number - 1].strip()
               and not source[number - 1].strip().startswith("#"))


def test_no_function_is_over_60_lines_of_code():
    long = []
    for path, tree in modules():
        source = path.read_text().splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and code_lines(node, source) > 60:
                long.append(f"{path.name}:{node.name} ({code_lines(node, source)} lines)")
    assert long == []


def test_import_rnnjax_is_cheap_and_the_api_is_exported():
    code = "import rnnjax, sys; print('jax' in sys.modules, sorted(rnnjax.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False")
    for name in ("ReLUCell", "rnn", "L1Norm", "L1NormLearned", "RunningCount", "fit", "sweep", "squared_error",
                 "relu_scan", "InputError", "data", "bptt"):
        assert name in rnnjax.__all__ and getattr(rnnjax, name) is not None
    from rnnjax.data import count_batch, l1_batch  # the modules are importable by their public names

    assert rnnjax.data.l1_batch is l1_batch and rnnjax.data.count_batch is count_batch
    assert callable(rnnjax.bptt.grad)
    with pytest.raises(AttributeError):
        rnnjax.no_such_name  # noqa: B018


def test_settings_table_names_the_tasks_and_recipes_the_code_defines():
    from rnnjax.app import settings, tasks
    from rnnjax.core import compensated, recurrence
    from rnnjax.training import recipes

    assert set(settings.TASKS) == set(tasks.TASKS)
    assert set(settings.RECIPES) == set(recipes.RECIPES)
    assert settings.RECIPES[tasks.DEFAULT_RECIPE] and set(settings.METHODS) == set(recurrence.METHODS)
    assert settings.PRECISIONS == compensated.PRECISIONS
