"""User-facing errors: `lsaq-run` prints the message as one line (no traceback) and exits 2."""


class LsaqRuntimeError(Exception):
    """Something wrong with the bundle, the arguments or the device, phrased as what to do."""


class NoVariantFits(LsaqRuntimeError):
    """No variant's memory need fits the free memory; carries the decision for display."""

    def __init__(self, message: str, decision=None):
        super().__init__(message)
        self.decision = decision
