"""The registered model's code, logged the way MLflow recommends ("models from code"): MLflow runs
this file to build the model when it loads it, so loading unpickles no Python object of ours.
The fold checkpoints and the threshold come in as the model's artifacts and model_config."""
import mlflow

from analysis.serving import EnsemblePyfunc

mlflow.models.set_model(EnsemblePyfunc())
