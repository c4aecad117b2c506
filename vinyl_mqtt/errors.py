"""The base of errors that are the user's to fix (a path, a setting): the CLI
prints them as one clear line, without a traceback."""


class VinylError(Exception):
    """Names what is wrong and where."""
