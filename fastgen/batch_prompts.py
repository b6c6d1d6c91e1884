"""Old path of the prompt-file reader; it lives in :mod:`fastgen.cli.batch.prompts` now."""

from fastgen.cli.batch.prompts import *  # noqa: F403
from fastgen.cli.batch.prompts import __all__  # noqa: F401
