"""Distributed pretraining on Ray Train with DeepSpeed ZeRO or DDP (docs/pretraining.md).

Entry points: ``caloforge pretrain`` (``cli.py``) and ``launch.run_pretrain(cfg)``; the config is
``config.PretrainConfig`` (``configs/pretrain/*.yaml``), the engine ``deepspeed_backend.DeepSpeedBackend``.
Submodules are imported on use: ``import caloforge.pretrain`` pulls in neither Ray nor DeepSpeed.
"""
