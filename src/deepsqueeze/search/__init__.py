"""Policy search: recipes with holes, sampled by Optuna, each point compressed, measured and answered.

A point of a space is an ordinary recipe that ``deepsqueeze compress`` replays to the same artifact bytes.
"""

from deepsqueeze.search.space import Hole, SearchSpace, StageTemplate, parse_space, read_space_file
from deepsqueeze.search.study import (
    PRUNERS,
    SAMPLERS,
    SearchResult,
    hypervolume,
    load_space,
    measure_point,
    pareto_front,
    run_search,
    validation_refs,
    write_answer,
)

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
