"""MLflow "models from code" entry for a cascade (logged by register_cascade, run by mlflow at load).

The class comes from the installed package; this file is all the registry holds of code, and nothing is pickled.
"""
import mlflow

from pipelines.registry.pyfunc_model import CascadeModel

mlflow.models.set_model(CascadeModel())
