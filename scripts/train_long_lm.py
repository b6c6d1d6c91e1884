"""Deprecated path, kept for one release: the trainer of ``samples/tiny-llada-long`` is
:mod:`fastgen.pipelines.training.long_lm` (``python -m fastgen.pipelines.training.long_lm --out DIR``, the
same options). Running this script logs one deprecation line and runs it."""

from fastgen.pipelines.training.long_lm import main

from fastgen._validation import log_moved

if __name__ == "__main__":
    log_moved("scripts/train_long_lm.py", "python -m fastgen.pipelines.training.long_lm")
    raise SystemExit(main())
