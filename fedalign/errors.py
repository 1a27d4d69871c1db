"""Errors a user can act on. The CLI prints their message as one line per problem and exits non-zero,
without a traceback; anything else is a bug and keeps its traceback."""


class FedalignError(Exception):
    """Base of user-facing errors: the message alone must say what is wrong and what to do."""


class RecipeError(FedalignError):
    """A recipe file, key or override is invalid."""


class DataError(FedalignError):
    """A dataset is missing, unreachable, or has a bad row (the message names the file and row)."""


class ModelError(FedalignError):
    """A base model or tokenizer cannot be found or loaded."""
