"""Distinct-n (n = 1..5) and expectation-adjusted distinct (EAD) as an `evaluate` module:
`evaluate.load("eval/metrics/distinct_n")`, offline. It calls `eval.diversity`, as the eval suite does.
"""

import datasets
import evaluate

from eval.diversity import DEFAULT_EAD_VOCAB_SIZE, NGRAM_ORDERS, distinct_n, ead_n

_DESCRIPTION = (
    "Distinct-n: unique n-grams over all n-grams of a set of texts (words and punctuation, lower-cased), for n = 1..5, "
    "and their mean; EAD (Liu et al. 2022) divides by the expected number of unique n-grams instead."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions: the set of texts (str).
    vocab_size: EAD's vocabulary size (default 50,000).
Returns:
    distinct_1..distinct_5, distinct_mean, ead_1..ead_5, ead_mean.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DistinctN(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions: list[str], vocab_size: int = DEFAULT_EAD_VOCAB_SIZE) -> dict[str, float]:
        result = {f"distinct_{n}": distinct_n(predictions, n) for n in NGRAM_ORDERS}
        result["distinct_mean"] = sum(result[f"distinct_{n}"] for n in NGRAM_ORDERS) / len(NGRAM_ORDERS)
        for n in NGRAM_ORDERS:
            result[f"ead_{n}"] = ead_n(predictions, n, vocab_size)
        result["ead_mean"] = sum(result[f"ead_{n}"] for n in NGRAM_ORDERS) / len(NGRAM_ORDERS)
        return result
