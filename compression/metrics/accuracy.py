"""Accuracy as an `evaluate` metric, shipped with the package so `evaluate.load` never reaches the hub.

Same name, inputs and output as the hub's `evaluate-metric/accuracy` (`{"accuracy": float}`), computed with numpy.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the proportion of predictions equal to their references (weighted if sample_weight)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): ground-truth labels.
    normalize (bool): a fraction if True (default), else the count of correct predictions.
    sample_weight (list of float): optional per-example weights.
Returns:
    accuracy (float): in [0, 1] when normalize is True.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = (np.asarray(predictions) == np.asarray(references)).astype(np.float64)
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        total = float((correct * weights).sum())
        return {"accuracy": total / float(weights.sum()) if normalize else total}
