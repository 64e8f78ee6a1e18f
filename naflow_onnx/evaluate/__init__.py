"""Evaluation building blocks, independent of the NAFlow engine.

* :mod:`.synthetic` - a seeded synthetic data set whose class is decided by one object,
  with that object's pixel mask (ground truth for the maps);
* :mod:`.nets` - four small CNNs (plain, residual, gated, conv4) for it;
* :mod:`.train` - trains them on CPU and exports ONNX with preprocessing metadata;
* :mod:`.metrics` - energy in mask, pointing game, deletion/insertion AUC, rank correlation
  and cascading weight randomisation (torch and ONNX);
* :mod:`.run` - the benchmark: ``run(model, EvaluateOptions(...))`` -> ``report.Evaluation``
  (the command ``naflow evaluate`` is :mod:`.cli`).

Only numpy/scipy/Pillow at import time; torch and onnx are imported where they are used.
"""
from .synthetic import CLASSES, make_dataset, make_image, save_dataset, load_dataset  # noqa: F401
from .metrics import (  # noqa: F401
    energy_in_mask, pointing_game, deletion_auc, insertion_auc, deletion_insertion_curve, resize_map,
    box_to_mask, onnx_prob_fn, spearman, randomisation_test, weight_bearing_nodes, randomise_onnx,
    cascading_randomisation_onnx, randomise_torch,
)
from .run import EvaluateOptions, run  # noqa: F401
