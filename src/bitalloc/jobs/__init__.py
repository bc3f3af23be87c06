"""One staged, resumable job shared by every command: measure -> plan -> quantize -> export.

* :mod:`.config`: the frozen :class:`~.config.RunConfig` the CLI builds (budgets parsed once), and the job
  fingerprint derived from it;
* :mod:`.store` / :mod:`.state`: the job directory (lock, ``job.json`` with a SHA-256 per checkpoint, verified on
  every open) and :func:`~.store.run_job`, the opening and finishing every command shares;
* :mod:`.checkpoints`: per-block checkpoints of the measurement and the quantization;
* :mod:`.stages`: the stages over one job (:class:`~.stages.Stages`);
* :mod:`.run`: ``measure`` (the measure stage only) and ``quantize`` / ``gguf`` (every stage, to an output
  :class:`~bitalloc.targets.base.Target`); :mod:`.sweep`: measure once, then plan + quantize + evaluate per budget.
"""
