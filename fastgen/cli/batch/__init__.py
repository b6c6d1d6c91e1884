"""``fastgen batch``: :mod:`.runner` (the runner and the command), :mod:`.prompts` (prompt files),
:mod:`.manifest` (journals and the resumable manifest). The names of :mod:`.runner` are importable from
here and from the old path ``fastgen.batch``."""

from .runner import *  # noqa: F403 - the package's public names are the runner's
from .runner import __all__  # noqa: F401
