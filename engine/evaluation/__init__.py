"""Frozen-encoder evaluation on MedMNIST: data files, features, probes, metrics.

`engine.eval` is the entry point (CLI and `evaluate_encoder` for the trainer); the modules
here each do one job:
- `medmnist`: the 12 tasks and their official `.npz` files.
- `features`: images → device → resize/normalize → encoder → pooled features, with a disk cache.
- `probe`: the linear probe (BatchNorm without affine + Linear, early stopping on val AUC) and kNN.
- `metrics`: AUC (rank based, exact with ties), accuracy, bootstrap confidence intervals.
"""
