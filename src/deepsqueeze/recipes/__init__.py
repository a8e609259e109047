"""Recipes: YAML files holding an ordered list of stages, validated, and the ``compress`` driver."""

from deepsqueeze.recipes.run import CompressResult, compress, run_stages
from deepsqueeze.recipes.schema import Recipe, load_recipe, parse_recipe

__all__ = ["CompressResult", "Recipe", "compress", "load_recipe", "parse_recipe", "run_stages"]
