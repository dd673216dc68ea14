"""Self-BLEU (Zhu et al. 2018) as an `evaluate` module: `evaluate.load("eval/metrics/self_bleu")`, offline.
It calls `eval.diversity.self_bleu`, as the eval suite does.
"""

import datasets
import evaluate

from eval.diversity import self_bleu

_DESCRIPTION = (
    "Self-BLEU: the mean BLEU-4 of each text against all the others (NLTK-compatible smoothing 'method1'); higher "
    "means the texts are more alike."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions: the set of texts (str), at least two.
Returns:
    self_bleu in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SelfBleu(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions: list[str]) -> dict[str, float]:
        if len(predictions) < 2:
            raise ValueError("self_bleu needs at least two texts.")
        return {"self_bleu": self_bleu(predictions)}
