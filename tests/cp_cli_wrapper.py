"""torchrun entry of ``tests/test_cli_context_parallel.py`` (a script, not a test module): runs
``fastgen.cli.main(sys.argv[1:])`` on a CPU rank.

diffusers 0.42 resolves the parallel config with ``rank % torch.accelerator.device_count()``, which
is 0 with CPU-only torch, and the CLI refuses a run without an accelerator (one line). This wrapper
(never the library or the CLI) makes ``torch.accelerator.device_count`` return 1, the one device of
a CPU rank, as ``tests/cp_worker.py`` does; the CLI then runs its context-parallel path over gloo.
"""

from __future__ import annotations

import sys

import torch

if __name__ == "__main__":
    torch.accelerator.device_count = lambda: 1  # test-only (module docstring)
    from fastgen.cli import main

    try:
        main(sys.argv[1:])
    except SystemExit as err:
        sys.exit(err.code)
