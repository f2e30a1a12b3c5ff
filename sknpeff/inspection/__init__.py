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
* :func:`pseudo_fisher_cosines`, :func:`coefficient_cosines` -- how similar one run's
  components are to each other; :func:`component_mass` -- each one's share of the
  coefficients.
* :func:`concept_purity`, :func:`multi_factor_recall` -- components against known
  concepts: purity of top examples, and whether an example made of several concepts has
  all of them among its strongest components (each beside its chance level).
* :func:`top_parameters_by_layer`, :func:`top_parameters_by_component` -- which parameter
  tensors hold a component's mass (one vector, or every component of a fitted estimator;
  components of a fit on randomly projected PEFs are first recovered in parameter space).
* :func:`plot_coefficients`, :func:`plot_top_examples`, :func:`plot_component_similarity`,
  :func:`plot_kl_ratios`, :func:`plot_coefficient_distribution` -- matplotlib figures
  (optional dependency, imported only when called).
* :func:`report` -- an HTML report: overview, sortable table, each component's examples
  (one page per component when there are many).
"""

from ._concepts import ConceptPurity, MultiFactorRecall, concept_purity, multi_factor_recall
from ._parameters import top_parameters_by_component, top_parameters_by_layer
from ._plots import (
    plot_coefficient_distribution,
    plot_coefficients,
    plot_component_similarity,
    plot_kl_ratios,
    plot_top_examples,
)
from ._report import report
from ._similarity import coefficient_cosines, component_similarity, pseudo_fisher_cosines
from ._summary import component_mass, component_summary, top_examples

__all__ = [
    "ConceptPurity",
    "MultiFactorRecall",
    "coefficient_cosines",
    "component_mass",
    "component_similarity",
    "component_summary",
    "concept_purity",
    "multi_factor_recall",
    "plot_coefficient_distribution",
    "plot_coefficients",
    "plot_component_similarity",
    "plot_kl_ratios",
    "plot_top_examples",
    "pseudo_fisher_cosines",
    "report",
    "top_examples",
    "top_parameters_by_component",
    "top_parameters_by_layer",
]
