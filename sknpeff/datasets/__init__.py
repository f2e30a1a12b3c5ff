"""Small planted problems, models and data for demos, tests and the gallery.

Everything here is generated or bundled: nothing is downloaded, and every function runs in
seconds on a laptop CPU.

* :func:`make_planted_lowrank` and :func:`make_planted_diagonal` build PEF matrices whose
  NPEFF decomposition is known exactly (the LRM-PEF and D-PEF layouts of Matena & Raffel,
  arXiv 2310.04649).
* :func:`load_digits_split`, :func:`make_digits_cnn` and :func:`train_digits_cnn` give a
  tiny convolutional classifier of scikit-learn's bundled 8x8 digits (about 97% held-out
  accuracy after a few seconds of CPU training).
* :func:`make_icl_task` and :func:`train_icl_model` give an in-context task (recall
  from the context, a table memorized in the weights, or both) and a tiny causal
  transformer (:class:`TinyCausalLM`) that learns it in seconds; the mechanism each
  example needs is known.
* :func:`make_gated_experts` builds a classifier whose experts are switched on by input
  bits, so the sub-computation used by each example is known by construction.
"""

from ._digits import DigitsCNN, load_digits_split, make_digits_cnn, train_digits_cnn
from ._experts import GatedExperts, make_gated_experts
from ._icl import MECHANISMS, TinyCausalLM, icl_vocabulary, make_icl_task, train_icl_model
from ._planted import make_planted_diagonal, make_planted_lowrank

__all__ = [
    "MECHANISMS",
    "DigitsCNN",
    "GatedExperts",
    "TinyCausalLM",
    "icl_vocabulary",
    "load_digits_split",
    "make_digits_cnn",
    "make_gated_experts",
    "make_icl_task",
    "make_planted_diagonal",
    "make_planted_lowrank",
    "train_digits_cnn",
    "train_icl_model",
]
