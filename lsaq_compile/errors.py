"""User-facing errors: the CLI prints the message alone (no traceback) and exits 2."""


class LsaqError(Exception):
    """A problem with the user's input or environment, phrased as what is wrong and what to do."""
