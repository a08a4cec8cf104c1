"""Model registry and export (docs/registry.md, docs/inference_contract.md).

- ``caloforge.registry.store``: ``RegistryStore`` (MLflow registry: register, aliases, promote, search,
  download, pull) and ``register_pretrained_bundle`` (the pretraining hook);
- ``caloforge.registry.pyfunc``: ``ShowerModelPyfunc``, the bundle as an MLflow pyfunc model;
- ``caloforge.registry.export``: ONNX export with onnxruntime parity check, torch (bundle) export;
- ``caloforge.registry.card``: model cards and the trained-range guard;
- ``caloforge.registry.bundle``: bundle loading/summary, digests, model-URI parsing.

Nothing is imported here, so ``import caloforge.registry.export`` never pulls in mlflow.
"""
