"""Old path of ``fastgen batch``'s runner; it lives in :mod:`fastgen.cli.batch` now."""

from fastgen.cli.batch import *  # noqa: F403
from fastgen.cli.batch import __all__  # noqa: F401
