"""The one exception type that the command line turns into a clean message."""


class TeslaError(Exception):
    """A user-facing error: bad input, bad settings, or a file that is not ours.

    The message must name the file or setting at fault and say how to fix it.
    ``tesla`` prints it without a traceback and exits with status 2.
    """
