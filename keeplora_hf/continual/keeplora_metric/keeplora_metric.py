"""KeepLoRA++ continual-learning metrics as an `evaluate` module; the numbers come from keeplora_hf itself."""

import datasets
import evaluate

from keeplora_hf.continual.metrics import compute_all

_DESCRIPTION = """
Continual-learning metrics from an accuracy matrix R of shape (T+1, T): row 0 is the model before any task
(zero-shot), row t the model after learning task t, column i task i; accuracies are fractions in [0, 1] and
None/NaN marks a cell that was not evaluated. Returns ZSCL/MTIL transfer, avg and last; MFT, MFN, MAA, BWT, FWT and
Chaudhry forgetting from the MLLM continual-learning papers; and the retention of held-out general sets.
"""

_KWARGS_DESCRIPTION = """
Args:
    accuracy_matrix (`list` of `list` of `float`): the T+1 rows of R, in order (one example per row, so `add`
        takes one row and `add_batch` several).
    general (`dict[str, list[float]]`, optional): per held-out general set, one accuracy per row of R.
Returns:
    dict with transfer, avg, last, mft, mfn, maa, bwt, fwt, forgetting, general_retention (NaN when undefined).
Examples:
    >>> metric = keeplora_hf.continual.metrics.load_metric()
    >>> metric.compute(accuracy_matrix=[[0.5, 0.4], [0.9, 0.5], [0.8, 0.9]])["mft"]
    0.9
"""

_CITATION = """
@inproceedings{zheng2023zscl,
  title={Preventing Zero-Shot Transfer Degradation in Continual Learning of Vision-Language Models},
  author={Zheng, Zangwei and Ma, Mingyuan and Wang, Kai and Qin, Ziheng and Yue, Xiangyu and You, Yang},
  booktitle={ICCV},
  year={2023}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class KeepLoRAMetric(evaluate.Metric):
    """Wraps `compute_all` so pipelines built on `evaluate` get the same numbers as the runner's report."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"accuracy_matrix": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, accuracy_matrix, general=None):
        return compute_all(accuracy_matrix, general)
