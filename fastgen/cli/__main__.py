"""``python -m fastgen.cli`` (e.g. ``torchrun --nproc-per-node 2 -m fastgen.cli batch prompts.jsonl ...``)."""

import sys

from fastgen.cli import main

sys.exit(main())
