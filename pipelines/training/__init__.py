"""Training scripts of the shipped tiny diffusion LMs (not library code: nothing in fastgen imports them).

- :mod:`fastgen.pipelines.training.tiny_lm` trains ``samples/tiny-llada-kv`` (key-value retrieval):
  ``python -m fastgen.pipelines.training.tiny_lm --out DIR``.
- :mod:`fastgen.pipelines.training.long_lm` trains ``samples/tiny-llada-long`` (the ledger task, long
  answers): ``python -m fastgen.pipelines.training.long_lm --out DIR``.
- :mod:`fastgen.pipelines.training.common` holds what both share: LLaDA's masked-diffusion loss, the
  optimiser and schedule, the training loop with its log, and the writers of LLaDA's published
  checkpoint layout.
"""
