"""GSM8K exact match as an `evaluate` module: `evaluate.load("eval/metrics/gsm8k_exact_match")`, offline.

It calls `eval.gsm8k.grade`, the grader the eval suite, the GRPO reward and rejection sampling use.
"""

import datasets
import evaluate

from eval.gsm8k import MODES, grade

_DESCRIPTION = (
    "GSM8K exact match (lm-evaluation-harness gsm8k): the completion's answer (strict: after '#### '; flexible: the "
    "last number) against the reference's final answer, ignoring commas, '$', a trailing period and a leading '+'."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions: completions (str).
    references: GSM8K solutions ending in "#### N", or bare answers.
Returns:
    exact_match_strict, exact_match_flexible (fractions in [0, 1]) and n.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Gsm8kExactMatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        n = len(predictions)
        result = {}
        for mode in MODES:
            correct = sum(grade(p, r, mode) for p, r in zip(predictions, references))
            result[f"exact_match_{mode}"] = correct / n if n else 0.0
        result["n"] = n
        return result
