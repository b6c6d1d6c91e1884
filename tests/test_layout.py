"""The layout's promises: old import paths still work through shims that log one deprecation line,
the library's internal modules import without cycles, and the one log-once helper logs once."""

from __future__ import annotations

import ast
import importlib
import logging
import sys
from pathlib import Path

import pytest

from fastgen import _validation

ROOT = Path(__file__).resolve().parents[1]


def test_hooks_shim_reexports_and_logs_one_deprecation_line(caplog):
    import fastgen.api
    import fastgen.tracking

    sys.modules.pop("fastgen.hooks", None)
    with caplog.at_level(logging.WARNING, logger="fastgen.deprecation"):
        hooks = importlib.import_module("fastgen.hooks")
        importlib.reload(hooks)
    assert caplog.text.count("`fastgen.hooks` moved to") == 1
    assert hooks.get_step_tracker is fastgen.tracking.get_step_tracker
    assert hooks.StepTracker is fastgen.tracking.StepTracker
    assert hooks.apply_to_pipeline is fastgen.api.apply_to_pipeline


def test_execute_plan_old_path(caplog):
    from fastgen.attention import execute, plan

    with caplog.at_level(logging.WARNING, logger="fastgen.deprecation"):
        assert plan.execute_plan is execute.execute_plan
        assert plan.execute_plan is execute.execute_plan
    assert caplog.text.count("fastgen.attention.plan.execute_plan") == 1
    with pytest.raises(AttributeError):
        plan.no_such_name  # noqa: B018


def test_log_once_per_process_and_per_instance(caplog):
    logger = logging.getLogger("fastgen.test_layout")
    seen: set[str] = set()
    with caplog.at_level(logging.INFO, logger="fastgen.test_layout"):
        for _ in range(3):
            _validation.log_once(logger, "process-wide", logging.INFO)
            _validation.log_once(logger, "per instance", logging.INFO, seen=seen)
        _validation.log_once(logger, "per instance", logging.INFO, seen=set())  # another instance
    assert caplog.text.count("process-wide") == 1
    assert caplog.text.count("per instance") == 2


@pytest.mark.parametrize(
    ("check", "args", "message"),
    [
        (_validation.check_int, ("steps", 0, 1), "steps=0 must be an integer >= 1"),
        (_validation.check_int, ("steps", True, 1), "steps=True must be an integer >= 1"),
        (_validation.check_int_in, ("step", 5, 0, 5), None),
        (
            _validation.check_int_in,
            ("step", 5, 0, 5, True),
            r"step=5 is out of range; allowed: integer in \[0, 5\)",
        ),
        (
            _validation.check_number,
            ("select", 0.0, 0.0, 1.0, True),
            r"select=0.0 is out of range; allowed: \(0.0, 1.0\]",
        ),
        (_validation.check_number, ("select", "a", 0.0, 1.0), "select='a' must be a number"),
        (
            _validation.check_block_size,
            ("block_size", 48),
            "block_size=48 is not allowed; it must be a power of two",
        ),
        (_validation.check_choice, ("form", "x", ("exact",)), "form='x' is not allowed; allowed: 'exact'"),
    ],
)
def test_validators_name_parameter_value_and_allowed(check, args, message):
    if len(args) == 5 and check is _validation.check_int_in:
        args, kwargs = args[:4], {"high_open": args[4]}
    elif len(args) == 5:
        args, kwargs = args[:4], {"low_open": args[4]}
    else:
        kwargs = {}
    if message is None:
        check(*args, **kwargs)
        return
    with pytest.raises(ValueError, match=message):
        check(*args, **kwargs)


def _internal_imports() -> dict[str, set[str]]:
    """Module -> internal modules it imports (module level and inside functions; module-level
    ``__getattr__`` shims left out), for fastgen/ and the root folders it maps."""
    folders = {
        "fastgen": "fastgen",
        "kernels": "fastgen.kernels",
        "pipelines": "fastgen.pipelines",
        "app": "fastgen.app",
    }
    files = {}
    for folder, prefix in folders.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([prefix, *parts])] = path
    edges: dict[str, set[str]] = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text())
        shims = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"]
        skip = {id(x) for s in shims for x in ast.walk(s)}
        pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        out = set()
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            out |= {n for n in names if n in files and n != mod}
        edges[mod] = {t for t in out if not (t.startswith(mod + ".") or mod.startswith(t + "."))}
    return edges


def test_no_import_cycles_in_the_library_core():
    """The library (fastgen/, kernels/, pipelines/, app/) imports without cycles, counting imports
    inside functions too."""
    edges = _internal_imports()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for mod in sorted(edges):
        if mod not in state:
            visit(mod, [mod])
