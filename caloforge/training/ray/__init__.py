"""The Ray Train path shared by every distributed job (pretraining, adaptation): ``config`` (the ``engine``
and ``cluster`` blocks), ``launch`` (driver: the Ray session with its authentication, the ``TorchTrainer``),
``worker`` (the worker's session, backend, resume and attempt records), ``checkpoints`` (checkpoints on Ray
storage with completion markers) and ``storage`` (the run directory on a local disk or any pyarrow
filesystem). Importing this package imports no Ray: ``launch`` imports it lazily; ``worker`` and
``checkpoints`` run inside Ray Train workers."""
