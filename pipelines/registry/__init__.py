"""MLflow model registry for cascade stages: evaluate, register, promote, roll back, and sample from it.

The CLI (jobs/cli.py) calls these functions; each option set is a typed config. Call
`pipelines.tracking.configure_tracking` first (it checks the URI in seconds, then sets it): the other functions use
MLflow's configured tracking URI.

Import functions from their submodules (`from pipelines.registry.promote import promote`): once a submodule
is imported, a package attribute of the same name (`promote`, `evaluate`) is that module, not the function.
Names are imported from their submodules on first use, so importing the package imports no torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "evaluate": ("EvalConfig", "EvalResult", "HeldOut", "compute_metrics", "evaluate_stage"),
    "loading": ("LoadedCascade", "ModelRef", "load_cascade", "load_registered_stage"),
    "metrics": ("KNOWN_METRICS", "MetricSpec"),
    "promote": ("PromotionDecision", "RollbackRecord", "list_stages", "promote", "rollback"),
    "register": ("CascadeSpec", "RegisterConfig", "register_cascade", "register_stage"),
    "safety": ("SafetyChecker", "SafetyConfig", "SafetyFlag", "safety_check"),
    "sampling": ("EditConfig", "SampleConfig", "SampleOutput", "edit", "sample_images", "upscale"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
