"""Helpers shared by several test modules."""

import numpy as np
from scipy.optimize import linear_sum_assignment


def matched_cos(truth, components):
    """|cos| of each true component with its Hungarian-matched fitted one (rows)."""
    a = truth / np.maximum(np.linalg.norm(truth, axis=1, keepdims=True), 1e-30)
    b = components / np.maximum(np.linalg.norm(components, axis=1, keepdims=True), 1e-30)
    S = np.abs(a @ b.T)
    rows, cols = linear_sum_assignment(-S)
    return S[rows, cols]
