"""Render the ``fastgen`` command's reference page from its argparse parser, so it cannot drift.

The page is built at documentation build time (``docs/hooks.py``) from ``fastgen.cli.build_parser()``:
every subcommand, nested subcommands included, with its usage, description and options. Subcommands
whose options are parsed by their own module (``fastgen bench fidelity ...`` hands everything after
the suite name to that module's ``main(argv)``) are rendered from that module's ``--help`` output.

Run it alone to print the page: ``python docs/gen_cli.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re

HEADER = """# CLI reference

This page is generated from the `fastgen` command's argument parser when the documentation is
built (`docs/gen_cli.py`), so it lists exactly the subcommands and options of the installed
version. `fastgen COMMAND --help` prints the same text in a terminal.

"""


def _escape(text: str) -> str:
    """Markdown-safe text: keep it literal (angle brackets, asterisks, underscores at word edges)."""
    text = text.replace("\\", "\\\\").replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")
    return re.sub(r"(?<!\w)_|_(?!\w)", r"\\_", text)


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _is_pass_through(parser: argparse.ArgumentParser) -> bool:
    """A subcommand that hands all its arguments to another module (one REMAINDER positional)."""
    real = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    return len(real) == 1 and real[0].nargs == argparse.REMAINDER


def _pass_through_help(path: list[str]) -> str:
    """The ``--help`` text of a subcommand that parses its own options (``fastgen bench fidelity``
    hands everything after the suite name to its module), asked through the command itself."""
    from fastgen.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main([*path, "--help"])
    text = out.getvalue().strip()
    if not text.startswith("usage:"):
        raise ValueError(f"fastgen {' '.join(path)} --help printed no usage")
    # the suite's own parser may name itself after its module: say how it is called here
    return re.sub(r"^usage: \S+( \S+)*? (?=\[)", f"usage: fastgen {' '.join(path)} ", text, count=1)


def _option_line(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    if action.option_strings:
        if action.nargs == 0:
            name = ", ".join(action.option_strings)
        else:
            metavar = formatter._format_args(action, action.dest.upper())
            name = ", ".join(f"{s} {metavar}" for s in action.option_strings)
    else:
        name = formatter._format_args(action, action.dest)
    help_text = formatter._expand_help(action) if action.help else ""
    extras = []
    if action.choices is not None and "{" not in name and not isinstance(action, argparse._SubParsersAction):
        extras.append("choices: " + ", ".join(f"`{c}`" for c in action.choices))
    default = action.default
    if (
        action.option_strings
        and action.nargs != 0
        and default not in (None, argparse.SUPPRESS)
        and "default" not in help_text
    ):
        extras.append(f"default: `{default}`")
    if action.required and action.option_strings:
        extras.append("required")
    tail = f" ({'; '.join(extras)})" if extras else ""
    return f"- `{name}`: {_escape(help_text)}{tail}"


def _render(parser: argparse.ArgumentParser, path: list[str], out: list[str]) -> None:
    name = " ".join(["fastgen", *path])
    level = "#" * min(2 + len(path), 4) if path else "##"
    out.append(f"{level} `{name}`\n")
    if path and _is_pass_through(parser):
        out.append(f"```text\n{_pass_through_help(path)}\n```\n")
        return
    parser.prog = name
    out.append(f"```text\n{parser.format_usage().strip()}\n```\n")
    if parser.description:
        out.append(_escape(parser.description.strip()) + "\n")
    sub = _subparsers(parser)
    positionals = [a for a in parser._positionals._group_actions if a is not sub]
    options = [a for a in parser._actions if a.option_strings and a.help is not argparse.SUPPRESS]
    if positionals:
        out.append("**Arguments**\n")
        out.extend(_option_line(parser, a) for a in positionals if a.help is not argparse.SUPPRESS)
        out.append("")
    if options:
        out.append("**Options**\n")
        out.extend(_option_line(parser, a) for a in options)
        out.append("")
    if sub is not None:
        helps = {a.dest: a.help for a in sub._choices_actions}
        out.append("**Subcommands**\n")
        for child in sub.choices:
            out.append(f"- `{child}`: {_escape(helps.get(child) or '')}")
        out.append("")
        for child, child_parser in sub.choices.items():
            _render(child_parser, [*path, child], out)


def render_cli_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """The Markdown of the CLI reference page for ``parser`` (default: ``fastgen.cli.build_parser()``)."""
    if parser is None:
        from fastgen.cli import build_parser

        parser = build_parser()
    out = [HEADER]
    _render(parser, [], out)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render_cli_reference())
