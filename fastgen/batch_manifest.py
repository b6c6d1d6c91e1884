"""Old path of the batch manifest; it lives in :mod:`fastgen.cli.batch.manifest` now."""

from fastgen.cli.batch.manifest import *  # noqa: F403
from fastgen.cli.batch.manifest import __all__  # noqa: F401
