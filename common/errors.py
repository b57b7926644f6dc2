"""The one exception for bad user input, and the one way a refused destination becomes one."""


class BadInput(Exception):
    """A problem with what the user gave us (a file, a folder, a name, an option).

    `str()` is "<path>: <cause>", or just the cause when there is no path. The command line prints it on one
    line and exits 2; nodes let it reach ComfyUI, which shows the message.
    """

    def __init__(self, path, cause):
        self.path = path
        self.cause = cause
        super().__init__(path, cause)  # args = (path, cause): copies and pickles rebuild it

    def __str__(self):
        return str(self.cause) if self.path is None else f"{self.path}: {self.cause}"


def cannot_write(path, exc: OSError) -> BadInput:
    """A destination the system refuses (a folder where the file goes, a file where a folder goes, no
    permission, a read-only or full disk): the user's choice of place, not a fault of ours."""
    return BadInput(path, f"cannot write there: {exc.strerror or exc}")
