"""The one exception type for mistakes a user can fix (bad config, missing data, bad rank)."""


class UserError(ValueError):
    """A mistake in the user's input. The CLI prints ``str(err)`` on one line and exits with code 2.

    Parameters
    ----------
    message : what is wrong, with the bad value and the allowed ones.
    file : the file the value came from, if any.
    key : the dotted config key, if any (e.g. ``decompose.bases``).
    """

    def __init__(self, message: str, file: str | None = None, key: str | None = None):
        self.file, self.key, self.message = file, key, message
        where = ": ".join(part for part in (file, key) if part)
        super().__init__(f"{where}: {message}" if where else message)
