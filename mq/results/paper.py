"""The paper's published numbers (MetaQuant, Chen, Wang & Pan, NeurIPS 2019), for the report's
"beside the paper" table. All of them live here, nowhere else.

Table 1: CIFAR-10, every layer quantized to 1 bit, 100 epochs, lr 1e-3 divided by 10 every 30
epochs; each number is the mean (and, in brackets, the spread the paper prints; the released
README calls it the variance) over 5 runs of the test accuracy of the last 10 epochs. Read
from the paper's camera-ready PDF (csyhhu/MetaQuant, MetaQuant-Preprint.pdf). The paper has no
BWN MultiFC row. The released README's table swaps the LSTMFC and FCGrad labels of the Adam
rows (dorefa 89.979/89.962, BWN 90.036/90.042); the paper's labels are kept here.
"""

from __future__ import annotations

from dataclasses import dataclass

TABLE1_SOURCE = (
    "MetaQuant (NeurIPS 2019) Table 1: CIFAR-10, 1-bit weights, 100 epochs; mean (spread) over "
    "5 runs of the last-10-epoch test accuracy"
)
# The data sets Table 1's numbers may be set beside: torchvision's CIFAR-10 (the paper's) and
# an image-folder copy of it (the JPEG copy in ../shared/data; full precision 81.80 there).
TABLE1_DATASETS = ("cifar10", "cifar10_folder")


@dataclass(frozen=True)
class PaperResult:
    mean: float
    spread: float


def _rows(model: str, text: str) -> dict[tuple[str, str, str, str], PaperResult]:
    out = {}
    for line in text.strip().splitlines():
        quant, optimizer, method, mean, spread = line.split()
        out[(model, quant, optimizer, method)] = PaperResult(float(mean), float(spread))
    return out


# (model, quant, optimizer, method) -> result; methods named as conf/meta/ names them.
TABLE1: dict[tuple[str, str, str, str], PaperResult] = {
    **_rows(
        "resnet20",
        """
        dorefa sgd ste 80.745 2.113
        dorefa sgd multifc 88.942 0.466
        dorefa sgd lstmfc 88.305 0.810
        dorefa sgd fcgrad 88.840 0.291
        dorefa adam ste 89.782 0.172
        dorefa adam multifc 89.941 0.068
        dorefa adam lstmfc 89.979 0.103
        dorefa adam fcgrad 89.962 0.068
        bwn sgd ste 75.913 3.495
        bwn sgd lstmfc 89.289 0.212
        bwn sgd fcgrad 88.949 0.231
        bwn adam ste 89.896 0.182
        bwn adam lstmfc 90.036 0.109
        bwn adam fcgrad 90.042 0.098
        """,
    ),
    **_rows(
        "resnet32",
        """
        dorefa sgd ste 82.911 1.680
        dorefa sgd multifc 89.637 0.380
        dorefa sgd lstmfc 90.397 0.149
        dorefa sgd fcgrad 89.934 0.246
        dorefa adam ste 90.172 0.077
        dorefa adam multifc 90.966 0.064
        dorefa adam lstmfc 90.948 0.074
        dorefa adam fcgrad 90.976 0.068
        bwn sgd ste 79.768 2.062
        bwn sgd lstmfc 90.568 0.169
        bwn sgd fcgrad 90.241 0.316
        bwn adam ste 91.015 0.087
        bwn adam lstmfc 91.002 0.077
        bwn adam fcgrad 91.034 0.067
        """,
    ),
    **_rows(
        "resnet44",
        """
        dorefa sgd ste 86.686 1.020
        dorefa sgd multifc 90.546 0.218
        dorefa sgd lstmfc 91.494 0.163
        dorefa sgd fcgrad 91.539 0.097
        dorefa adam ste 91.079 0.064
        dorefa adam multifc 91.772 0.073
        dorefa adam lstmfc 91.870 0.022
        dorefa adam fcgrad 91.989 0.067
        bwn sgd ste 82.647 0.334
        bwn sgd lstmfc 91.498 0.057
        bwn sgd fcgrad 91.614 0.081
        bwn adam ste 91.121 0.023
        bwn adam lstmfc 91.498 0.271
        bwn adam fcgrad 92.107 0.059
        """,
    ),
}
# Full-precision test accuracy of the starting models (Table 1's "FP Acc").
TABLE1_FP = {"resnet20": 91.5, "resnet32": 92.13, "resnet44": 93.56}


def table1_result(
    model: str, dataset: str, quant: str, bits: object, optimizer: str, method: str
) -> PaperResult | None:
    """Table 1's number for a report cell, or None when the paper has none for it (another
    data set, bit width, model, method, or BWN MultiFC, which the paper did not run)."""
    if dataset not in TABLE1_DATASETS or str(bits) != "1":
        return None
    return TABLE1.get((model, quant, optimizer, method))


def covers(model: str, dataset: str, bits: object) -> bool:
    """Whether a report row is one of Table 1's settings (a paper cell may still be empty)."""
    return dataset in TABLE1_DATASETS and str(bits) == "1" and model in TABLE1_FP
