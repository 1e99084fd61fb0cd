"""Recipes: an ordered list of compression passes with their configs, then export targets and
bench settings, validated before anything runs (``schema``) and run by ``runner``.

    from vitc.recipes import load_recipe, compress
    manifest = compress(load_recipe("recipe.yaml"), "out/", model="zoo:vit-c10")
"""
from .runner import compress, measure_artifact, reproduced
from .schema import PASSES, RECIPE_VERSION, Recipe, load_recipe, parse_recipe, recipe_from_dict

__all__ = ["PASSES", "RECIPE_VERSION", "Recipe", "compress", "load_recipe", "measure_artifact", "parse_recipe",
           "recipe_from_dict", "reproduced"]
