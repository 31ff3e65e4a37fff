"""User-facing errors.  The CLI maps them to exit codes: bad input -> 2, failed verification -> 1."""


class RewriteError(Exception):
    """Bad input: a file, option or batch the toolkit cannot use.  Message is one line, says why."""

    exit_code = 2


class VerificationError(RewriteError):
    """A rewrite or a compiled path disagrees with the reference beyond its tolerance."""

    exit_code = 1
