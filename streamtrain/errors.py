"""Errors a user can cause. The CLI turns them into one line on stderr and exit code 2."""

__all__ = ["UserError", "DataError"]


class UserError(Exception):
    """Bad flags, missing files, bad input: the message is the whole story, no traceback."""

    exit_code = 2  # what the command exits with; a subclass may name a more specific outcome


class DataError(UserError):
    """A dataset on disk is missing, corrupt, or does not match its index."""
