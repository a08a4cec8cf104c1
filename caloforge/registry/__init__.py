"""Model registry and export (docs/registry.md, docs/inference_contract.md).

- ``caloforge.registry.store``: ``RegistryStore`` (MLflow registry: register, aliases, promote, search,
  download, pull) and ``register_pretrained_bundle`` (the pretraining hook); a facade over
  ``registration`` (atomic registration), ``lookup`` (get/resolve/list/search), ``promotion`` (aliases,
  recorded promotions), ``download`` (verified download, pull) and ``versions`` (what a version records);
- ``caloforge.registry.pyfunc``: ``ShowerModelPyfunc``, the bundle as an MLflow pyfunc model;
- ``caloforge.registry.export``: ONNX export (gated by the parity check) and torch (bundle) export, over
  ``onnx_graph`` (the exported graph, its names, the seed convention), ``onnx_runtime`` (onnxruntime
  sessions, ``OnnxShowerGenerator``) and ``parity`` (onnxruntime vs PyTorch);
- ``caloforge.registry.card``: model cards and the trained-range guard;
- ``caloforge.registry.bundle``: bundle loading/summary, digests, model-URI parsing.

Nothing is imported here, so ``import caloforge.registry.export`` never pulls in mlflow.
"""
