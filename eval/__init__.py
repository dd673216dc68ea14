"""Evaluation suite: GSM8K, MMLU, response length, diversity, reward and KL, as a CLI (`python -m eval`), a Python
function (`evaluate_model`) and a training callback (`eval.callback.EvalCallback`). See eval/README.md."""

from eval.data import EvalError
from eval.suite import TASKS, evaluate_model, flatten_metrics, load_eval_data, run_tasks, score_predictions

__all__ = [
    "TASKS",
    "EvalError",
    "evaluate_model",
    "flatten_metrics",
    "load_eval_data",
    "run_tasks",
    "score_predictions",
]
