"""Engine: partitioning, offload, expert parallelism and planning, applied to a model from
outside (``myriad.engine.engine.apply``; the trainer goes through ``myriad.engine.runtime``)."""
