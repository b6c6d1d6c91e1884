"""The documentation's promises, checked in the suite.

- Every public name (``__all__`` of ``fastgen``, ``fastgen.attention``, ``fastgen.pipelines``) has a
  docstring with an example; the examples of the tensor-level ops and the configs run as doctests.
- The CLI reference generator renders every subcommand and option of ``fastgen.cli.build_parser()``.
- Every ``fastgen ...`` command shown in README.md and docs/ parses with today's parser, and the test
  command README gives is the one CI runs.
"""

from __future__ import annotations

import argparse
import doctest
import importlib.util
import os
import re
import shlex
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")


def _load(name: str):
    """A module of the docs tooling (docs/ is no package)."""
    spec = importlib.util.spec_from_file_location(f"fastgen_docs_{name}", os.path.join(DOCS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


public_api = _load("public_api")
gen_cli = _load("gen_cli")


# ---------------------------------------------------------------- docstrings and doctests


def test_every_public_name_has_a_docstring_with_an_example():
    names = public_api.public_names()
    assert len(names) >= 30, [n.public_path for n in names]
    assert public_api.undocumented(names) == []


def test_the_docstring_check_fails_on_a_name_without_an_example():
    def bare():
        """Does something."""

    def shown():
        """Does something.

        Example:
            >>> shown()
        """

    entries = [
        public_api.PublicName("m", "bare", bare, "m.bare", public_api._own_docstring(bare)),
        public_api.PublicName("m", "shown", shown, "m.shown", public_api._own_docstring(shown)),
        public_api.PublicName("m", "nothing", lambda: None, "m.nothing", None),
    ]
    assert public_api.undocumented(entries) == [
        "m.bare (defined as m.bare): docstring has no example",
        "m.nothing (defined as m.nothing): no docstring",
    ]


def test_a_dataclass_generated_signature_is_not_a_docstring():
    from dataclasses import dataclass

    @dataclass
    class Undocumented:
        x: int = 0

    assert public_api._own_docstring(Undocumented) is None


def _doctest_targets():
    """The pure-tensor ops of ``fastgen.attention`` and the configs and presets: cheap, CPU, no model."""
    import fastgen
    import fastgen.attention
    import fastgen.pipelines

    targets = [(f"fastgen.attention.{n}", getattr(fastgen.attention, n)) for n in fastgen.attention.__all__]
    targets += [(f"fastgen.{n}", getattr(fastgen, n)) for n in fastgen.__all__ if n.endswith("Config")]
    targets += [(f"fastgen.pipelines.{n}", getattr(fastgen.pipelines, n)) for n in ("Preset", "get_preset")]
    return targets


DOCTEST_TARGETS = _doctest_targets()


@pytest.mark.parametrize("name,obj", DOCTEST_TARGETS, ids=[name for name, _ in DOCTEST_TARGETS])
def test_docstring_examples_run(name, obj, monkeypatch):
    # the native CPU kernel's first use compiles it; the examples check the documented results, so the
    # PyTorch engine on gathered blocks (the same maths) keeps this test fast on a fresh machine
    monkeypatch.setenv("FASTGEN_CPU_KERNEL", "0")
    import fastgen.attention

    globs = {"torch": torch, **{n: getattr(fastgen.attention, n) for n in fastgen.attention.__all__}}
    finder = doctest.DocTestFinder(recurse=False)
    tests = [t for t in finder.find(obj, name, globs=globs) if t.examples]
    assert tests, f"{name}: no >>> example to run"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        torch.manual_seed(0)
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (output above)"


def test_the_presets_data_docstring_example_runs():
    # PRESETS is a dict: its docstring is the string after its assignment, read from the source
    entry = next(n for n in public_api.public_names() if n.public_path == "fastgen.pipelines.PRESETS")
    test = doctest.DocTestParser().get_doctest(entry.docstring, {}, entry.public_path, None, 0)
    runner = doctest.DocTestRunner()
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


# ---------------------------------------------------------------- CLI reference


def _all_parsers(parser: argparse.ArgumentParser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _all_parsers(child, (*path, name))


def test_cli_reference_lists_every_subcommand_and_option():
    from fastgen.cli import build_parser

    page = gen_cli.render_cli_reference(build_parser())
    for path, parser in _all_parsers(build_parser()):
        assert f"`{' '.join(('fastgen', *path))}`" in page, path
        for action in parser._actions:
            for option in action.option_strings:
                assert option in page, (path, option)
    # every subcommand shows its usage, the bench suites that parse their own options included
    for path, _ in _all_parsers(build_parser()):
        if path:
            name = " ".join(("fastgen", *path))
            section = page.split(f"`{name}`\n", 1)[1].split("\n#", 1)[0]
            assert f"usage: {name}" in section, path


def test_cli_reference_follows_a_changed_parser():
    parser = argparse.ArgumentParser(prog="fastgen")
    sub = parser.add_subparsers(dest="command")
    tool = sub.add_parser("tool", help="a new subcommand", description="A new subcommand.")
    tool.add_argument("--level", type=int, default=3, choices=[1, 2, 3], help="how much")
    tool.add_argument("--flag", action="store_true", help="a switch")
    inner = tool.add_subparsers(dest="inner").add_parser("deep", help="nested")
    inner.add_argument("path", help="a positional")
    page = gen_cli.render_cli_reference(parser)
    assert "### `fastgen tool`" in page and "#### `fastgen tool deep`" in page
    assert "- `--level {1,2,3}`: how much (default: `3`)" in page
    assert "- `--flag`: a switch" in page
    assert "- `path`: a positional" in page


# ---------------------------------------------------------------- commands shown in the docs


def _fenced_blocks(text: str, languages=("bash", "sh", "shell", "console", "")):
    """The contents of the fenced code blocks in ``languages`` (fences paired in order)."""
    blocks, current, language = [], None, None
    for line in text.splitlines():
        fence = re.match(r"^\s*```(\w*)", line)
        if fence and current is None:
            current, language = [], fence.group(1)
        elif fence:
            if language in languages:
                blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def _documented_commands():
    """Every ``fastgen ...`` command line in README.md and docs/*.md code blocks (with its file)."""
    files = [os.path.join(ROOT, "README.md")]
    for folder, _, names in os.walk(DOCS):
        files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".md")]
    commands = []
    for path in files:
        if os.path.basename(path) == "design.md":
            continue  # written by the design page's owner; describes code, not commands to run
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for block in _fenced_blocks(text):
            block = block.replace("\\\n", " ")
            for line in block.splitlines():
                for part in re.split(r"&&|;|\|", line):
                    part = part.split("#", 1)[0].strip()
                    try:
                        words = shlex.split(part) if part else []
                    except ValueError:  # unbalanced quotes: fine in prose, not in a fastgen command
                        assert not re.match(r"\S*fastgen\s", part), f"{path}: cannot split {part!r}"
                        continue
                    # `.venv/bin/fastgen ...` and `fastgen ...`, not `python -m fastgen.x` or pip lines
                    if words and os.path.basename(words[0]) == "fastgen":
                        commands.append((os.path.relpath(path, ROOT), words[1:]))
    return commands


def test_every_documented_fastgen_command_parses():
    from fastgen.cli import build_parser

    commands = _documented_commands()
    assert len(commands) >= 10, commands
    for where, argv in commands:
        if "--help" in argv or "-h" in argv:
            continue
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: `fastgen {' '.join(argv)}` does not parse with today's CLI")
        if getattr(args, "suite_args", None):  # a pass-through bench suite parses its own options
            usage = gen_cli._pass_through_help(["bench", args.suite])
            for option in (a.split("=", 1)[0] for a in args.suite_args if a.startswith("--")):
                assert re.search(rf"{re.escape(option)}\b", usage), (
                    f"{where}: `fastgen {' '.join(argv)}`: {option} is not an option of the suite"
                )


README_TEST_COMMAND = (
    'python3 -m venv .venv && .venv/bin/python -m pip install "torch==2.13.0" -e ".[test]" '
    "&& .venv/bin/python -m pytest -q"
)


def test_readme_gives_the_test_command_ci_runs_under_a_tests_heading():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    match = re.search(r"^#+ [^\n]*Tests[^\n]*\n(.*?)(?=^#)", readme, flags=re.S | re.M)
    assert match, "README.md needs a heading containing 'Tests'"
    assert f"```bash\n{README_TEST_COMMAND}\n```" in match.group(1)


def test_readme_is_short():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 220


def test_docs_pages_in_the_nav_exist():
    """Every page mkdocs.yml's nav names exists in docs/ or is generated by docs/hooks.py."""
    with open(os.path.join(ROOT, "mkdocs.yml"), encoding="utf-8") as f:
        pages = re.findall(r":\s*([\w/.-]+\.md)\s*$", f.read(), flags=re.M)
    generated = {"cli.md", "api/fastgen.md", "api/attention.md", "api/pipelines.md"}
    owned_elsewhere = {"design.md"}  # the design page is written with the code it describes
    missing = [
        p for p in pages if p not in generated | owned_elsewhere and not os.path.isfile(os.path.join(DOCS, p))
    ]
    assert missing == []
