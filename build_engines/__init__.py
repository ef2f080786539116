"""EdgeAD offline toolchain: models, distillation, training, calibration, export, engines, bundles."""
