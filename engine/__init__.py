"""The trainer: MAE (and DINOv2) objectives on timm ViTs. `python -m engine.run RECIPE`."""
