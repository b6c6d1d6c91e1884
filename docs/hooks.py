"""MkDocs hooks of the fastgen documentation (declared in ``mkdocs.yml``).

At build time they
- write the CLI reference (``cli.md``) from ``fastgen.cli.build_parser()`` (``docs/gen_cli.py``);
- write one API reference page per public module (``api/*.md``) from the names in its ``__all__``,
  each rendered by mkdocstrings from the module that defines it (``docs/public_api.py``), and warn
  (which fails ``mkdocs build --strict``) on a public name whose docstring has no example;
- publish the screenshots and plots of ``samples/`` under ``assets/samples/``;
- replace ``<!-- fastgen:presets -->`` in a page by the table of the presets that exist.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import sys
import tempfile
import textwrap

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)
if DOCS not in sys.path:
    sys.path.insert(0, DOCS)

import gen_cli  # noqa: E402
import public_api  # noqa: E402

log = logging.getLogger("mkdocs.plugins.fastgen")

API_PAGES = {
    "fastgen": ("api/fastgen.md", "Configs, apply / remove, statistics: what `import fastgen` gives."),
    "fastgen.attention": (
        "api/attention.md",
        "Model-agnostic attention ops on SDPA-layout tensors `[batch, heads, tokens, head_dim]`. "
        "Their examples run as doctests in the test suite (`tests/test_docs.py`).",
    ),
    "fastgen.pipelines": (
        "api/pipelines.md",
        "The diffusion-LM and autoregressive-Wan pipelines, the Self-Forcing checkpoint loader, the presets.",
    ),
}
"""Public module -> (page, one-line introduction)."""


def _source_tree_for_griffe() -> str:
    """A temporary copy (symlinks) of the ``fastgen`` package in the layout a wheel installs.

    ``fastgen.kernels``, ``fastgen.pipelines`` and ``fastgen.app`` are modules (``fastgen/kernels.py``
    ...) whose ``__path__`` points at the repository root's ``kernels/``, ``pipelines/`` and ``app/``
    folders; static analysis (griffe) cannot follow that, so it is given a tree where each of them is
    a package: ``fastgen/kernels/__init__.py`` (the module) beside the folder's files. Where a folder
    is already inside ``fastgen/`` (or gone), the tree is a plain copy.
    """
    tree = tempfile.mkdtemp(prefix="fastgen-docs-src-")
    package = os.path.join(ROOT, "fastgen")
    mirror = os.path.join(tree, "fastgen")
    os.mkdir(mirror)
    mapped = set()
    for name in ("kernels", "pipelines", "app"):
        folder, module = os.path.join(ROOT, name), os.path.join(package, f"{name}.py")
        if (
            os.path.isdir(folder)
            and os.path.isfile(module)
            and not os.path.exists(os.path.join(folder, "__init__.py"))
        ):
            os.mkdir(os.path.join(mirror, name))
            os.symlink(module, os.path.join(mirror, name, "__init__.py"))
            for entry in os.listdir(folder):
                os.symlink(os.path.join(folder, entry), os.path.join(mirror, name, entry))
            mapped.add(f"{name}.py")
    for entry in os.listdir(package):
        if entry not in mapped:
            os.symlink(os.path.join(package, entry), os.path.join(mirror, entry))
    atexit.register(shutil.rmtree, tree, ignore_errors=True)
    return tree


@event_priority(100)  # before mkdocstrings' own on_config, which instantiates the handler
def on_config(config):
    """Point mkdocstrings' static analysis at the wheel-layout view of the package."""
    handlers = config.plugins["mkdocstrings"].config["handlers"]
    handlers.setdefault("python", {})["paths"] = [_source_tree_for_griffe()]
    return config


def _markdown_docstring(text: str) -> str:
    """A plain docstring as Markdown: its ``Example:`` section becomes a ``pycon`` code block."""
    parts = re.split(r"^(Examples?:)\s*$", text, maxsplit=1, flags=re.M)
    if len(parts) == 1:
        return text
    head, sep, example = parts
    return f"{head.rstrip()}\n\n**{sep}**\n\n```pycon\n{textwrap.dedent(example).strip()}\n```"


def _api_page(module: str, intro: str, names: list[public_api.PublicName]) -> str:
    lines = [f"# `{module}`\n", intro + "\n"]
    for entry in names:
        lines.append(f"## `{entry.public_path}`\n")
        lines.append(f"`from {module} import {entry.name}`\n")
        if entry.is_data:
            # a module-level constant: its docstring (read from the source) is written out here
            lines.append(_markdown_docstring(entry.docstring or "") + "\n")
            if entry.public_path == "fastgen.pipelines.PRESETS":
                lines.append(_presets_table() + "\n")
            continue
        lines.append(f"::: {entry.target}")
        lines.append("    options:")
        lines.append("      show_root_heading: false")
        lines.append("      heading_level: 3")
        lines.append("")
    return "\n".join(lines)


def on_files(files: Files, config) -> Files:
    """Add the generated pages and the sample images to the site."""
    files.append(File.generated(config, "cli.md", content=gen_cli.render_cli_reference()))

    names = public_api.public_names()
    for problem in public_api.undocumented(names):
        log.warning("public name without a documented example: %s", problem)
    for module, (page, intro) in API_PAGES.items():
        content = _api_page(module, intro, [n for n in names if n.module == module])
        files.append(File.generated(config, page, content=content))

    samples = os.path.join(ROOT, "samples")
    for name in sorted(os.listdir(samples)):
        if name.endswith(".png"):
            files.append(
                File.generated(config, f"assets/samples/{name}", abs_src_path=os.path.join(samples, name))
            )
    return files


def _presets_table() -> str:
    from fastgen.pipelines import PRESETS

    rows = ["| preset | kind | what it is |", "|---|---|---|"]
    for preset in PRESETS.values():
        kind = preset.kind + (f" ({preset.family})" if preset.family else "")
        rows.append(f"| `{preset.name}` | {kind} | {preset.description} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Fill the generated tables into the pages that ask for them."""
    if "<!-- fastgen:presets -->" in markdown:
        markdown = markdown.replace("<!-- fastgen:presets -->", _presets_table())
    return markdown
