"""Policy search: recipes with holes, sampled by Optuna, each point compressed, measured and answered.

A point of a space is an ordinary recipe that ``deepsqueeze compress`` replays to the same artifact bytes.

One module per concern: ``space`` (the space file, holes, points), ``study`` (the driver: samplers, pruners,
the loop), ``trial`` (one point compressed and measured; the objective), ``priors`` (points seeded from
sensitivity scans), ``front`` (Pareto front, hypervolume, the answer's files), ``storage`` (the study folder
and the Optuna storage). ``study`` imports the others; none of them imports ``study``.
"""

from deepsqueeze.search.front import SearchResult, hypervolume, pareto_front, write_answer
from deepsqueeze.search.space import (
    Hole,
    SearchSpace,
    StageTemplate,
    load_space,
    parse_space,
    read_space_file,
)
from deepsqueeze.search.study import PRUNERS, SAMPLERS, run_search
from deepsqueeze.search.trial import measure_point, validation_refs

__all__ = [
    "PRUNERS",
    "SAMPLERS",
    "Hole",
    "SearchResult",
    "SearchSpace",
    "StageTemplate",
    "hypervolume",
    "load_space",
    "measure_point",
    "pareto_front",
    "parse_space",
    "read_space_file",
    "run_search",
    "validation_refs",
    "write_answer",
]
