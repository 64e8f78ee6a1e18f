"""``naflow check`` / ``naflow baseline``: gate a model on its attention (docs/check.md).

Checks per image: the prediction, the final layer's mass inside an expected region, the
stability of the flow (every stage's map against the final map) and the drift against a
baseline recorded from a trusted model version; per model: a weight-randomisation sanity gate.
"""
from .checks import BaselineError, pearson, randomise_weights, spearman
from .config import ConfigError, load_config
from .run import main_baseline, main_check

__all__ = ["main_check", "main_baseline", "load_config", "ConfigError", "BaselineError",
           "randomise_weights", "pearson", "spearman"]
