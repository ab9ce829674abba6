"""Calibrating the class head after training: one temperature fitted on validation logits, and the "unknown" threshold.

Temperature scaling (Guo et al. 2017) divides the logits by one scalar T chosen
to minimise the validation negative log-likelihood: the ranking of classes, so
top-1 accuracy, never changes, only how confident the scores are. The threshold
is then read off the calibrated validation scores: the score that keeps
`keep` (95%) of the correct validation predictions; anything scoring below it
is stored as "unknown".
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

KEEP_CORRECT = 0.95  # share of correct validation predictions that must stay above the threshold
# With a familiarity test as well, the score threshold only catches the least confident predictions.
KEEP_CORRECT_SCORE = 0.99
T_RANGE = (0.05, 100.0)  # the fitted temperature is clipped to this


def fit_temperature(logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                    max_iter: int = 200) -> float:
    """The T > 0 minimising the mean NLL of softmax(logits / T) for `labels` (LBFGS over log T)."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if len(labels) == 0:
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)  # log T keeps T positive
    optimiser = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimiser.step(closure)
    t = float(log_t.detach().exp())
    # A validation set the head gets all right drives T towards 0 (every score 1.0, no threshold possible): bound it.
    return float(np.clip(t, *T_RANGE)) if np.isfinite(t) else 1.0


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / temperature)."""
    return float(F.cross_entropy(torch.as_tensor(np.asarray(logits), dtype=torch.float64) / temperature,
                                 torch.as_tensor(np.asarray(labels), dtype=torch.int64)))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return torch.as_tensor(np.asarray(logits), dtype=torch.float64).div(temperature).softmax(1).numpy()


def unknown_threshold(scores: np.ndarray, correct: np.ndarray, keep: float = KEEP_CORRECT) -> float:
    """The highest score that keeps at least `keep` of the correct predictions at or above it (0: none correct)."""
    good = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(correct, dtype=bool)])
    if good.size == 0:
        return 0.0
    # Dropping the floor((1 - keep) * n) lowest correct scores keeps at least `keep` of them.
    return float(good[int(np.floor((1 - keep) * good.size + 1e-9))])
