"""MLflow "models from code" entry for one cascade stage (logged by register_stage, run by mlflow at load).

The class comes from the installed package; this file is all the registry holds of code, and nothing is pickled.
"""
import mlflow

from pipelines.registry.pyfunc_model import StageModel

mlflow.models.set_model(StageModel())
