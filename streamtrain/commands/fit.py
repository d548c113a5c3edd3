"""`streamtrain fit` (placeholder until its issue lands)."""

from streamtrain.errors import UserError


def add_arguments(parser):
    pass


def run(args):
    raise UserError("fit is not available yet")
