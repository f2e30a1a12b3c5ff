"""Reading NPEFF components: top examples, summaries, run similarity, plots and a report.

Everything here works on a coefficient matrix ``W`` of shape ``(n_examples,
n_components)`` (held-out coefficients from ``transform`` are best), so any method that
produces such a matrix (NPEFF, clustering baselines) can be inspected the same way.

* :func:`top_examples` -- each component's examples, by descending coefficient.
* :func:`component_summary` -- label/prediction purity, PEF norms and coefficients of the
  top examples, one entry per component.
* :func:`component_similarity` -- how closely two runs' components match (average max
  cosine of coefficient columns, both directions; Matena & Raffel, arXiv 2310.04649,
  section 3.3).
* :func:`concept_purity`, :func:`multi_factor_recall` -- components against known
  concepts: purity of top examples, and whether an example made of several concepts has
  all of them among its strongest components (each beside its chance level).
* :func:`top_parameters_by_layer` -- which parameter tensors hold a component's mass.
* :func:`plot_coefficients`, :func:`plot_top_examples` -- matplotlib figures (optional
  dependency, imported only when called).
* :func:`report` -- one self-contained HTML file with everything above per component.
"""

from ._concepts import ConceptPurity, MultiFactorRecall, concept_purity, multi_factor_recall
from ._parameters import top_parameters_by_layer
from ._plots import plot_coefficients, plot_top_examples
from ._report import report
from ._similarity import component_similarity
from ._summary import component_summary, top_examples

__all__ = [
    "ConceptPurity",
    "MultiFactorRecall",
    "concept_purity",
    "component_similarity",
    "component_summary",
    "multi_factor_recall",
    "plot_coefficients",
    "plot_top_examples",
    "report",
    "top_examples",
    "top_parameters_by_layer",
]
