"""``naflow check`` / ``naflow baseline``: gate a model on its attention (docs/check.md).

Checks per image: the prediction, the final layer's mass inside an expected region, the
stability of the flow (every stage's map against the final map) and the drift against a
baseline recorded from a trusted model version; per model: a weight-randomisation sanity gate.

From Python: ``run(model, config, baseline=None, options=CheckOptions())`` -> ``CheckResult``,
``record_baseline(model, config, output, options)``. The commands: ``main_check``,
``main_baseline`` (``check.cli``).
"""
from .checks import BaselineError, pearson, randomise_weights, spearman
from .cli import main_baseline, main_check
from .config import ConfigError, load_config
from .run import CheckOptions, CheckResult, record_baseline, run

__all__ = ["run", "record_baseline", "CheckOptions", "CheckResult", "main_check", "main_baseline",
           "load_config", "ConfigError", "BaselineError", "randomise_weights", "pearson", "spearman"]
