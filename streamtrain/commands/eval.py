"""`streamtrain eval` (placeholder until its issue lands)."""

from streamtrain.errors import UserError


def add_arguments(parser):
    pass


def run(args):
    raise UserError("eval is not available yet")
