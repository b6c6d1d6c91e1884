"""Old path of ``fastgen batch``'s runner; it lives in :mod:`fastgen.cli.batch` now."""

from fastgen.cli.batch.runner import *  # noqa: F403
from fastgen.cli.batch.runner import __all__  # noqa: F401
