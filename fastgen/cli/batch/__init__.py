"""``fastgen batch``: :mod:`.runner` (the runner), :mod:`.command` (the command), :mod:`.prompts` (prompt
files), :mod:`.manifest` (journals and the resumable manifest). The names of :mod:`.runner` and
:mod:`.command` are importable from here and from the old path ``fastgen.batch``."""

from . import command, runner
from .command import *  # noqa: F403 - the package's public names are the runner's and the command's
from .runner import *  # noqa: F403

__all__ = [*runner.__all__, *command.__all__]
