"""MLflow "models from code" definition of the decoupled reward model.

MLflow runs this file when the model is loaded (``mlflow.pyfunc.load_model``); the logic
lives in `unifl.tracking.pyfunc_models` so that it is tested with the library.
Logged by `unifl.tracking.models.log_reward_model`.
"""

from mlflow.models import set_model

from unifl.tracking.pyfunc_models import UniflRewardModel

set_model(UniflRewardModel())
