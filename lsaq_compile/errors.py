"""User-facing errors: the CLI prints the message alone (no traceback) and exits 2."""


class LsaqError(Exception):
    """A problem with the user's input or environment, phrased as what is wrong and what to do."""


class NonFiniteError(LsaqError):
    """A pass's values are not finite: NaN/inf weights, or states past the compute dtype's range
    (float16 on a GPU: Gemma's residual reaches about 1.0e5). A build computing in float16 by
    default tries float32 before giving up."""


class Terminated(BaseException):
    """SIGTERM, raised where the program is (the CLI's handler): it unwinds like Ctrl-C, so
    temporaries are removed and a build keeps its finished stages for --resume; a
    BaseException, so no `except Exception` takes it."""
