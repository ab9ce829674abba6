"""The errors simsearch raises: each message says what the user should do next."""
from __future__ import annotations


class SimsearchError(Exception):
    """Base of every error the CLI turns into one line on stderr and exit code 1."""


class NotFoundError(SimsearchError):
    """A file, folder, record or index that the user named does not exist."""


class BadInputError(SimsearchError):
    """Input that exists but cannot be used (unreadable image, bad option value)."""


class SpecMismatchError(SimsearchError):
    """An index, head or query was made with another backbone or preprocessing."""


class WeightsUnavailableError(SimsearchError):
    """Pretrained weights could be neither found locally nor downloaded."""


class ImageTooLargeError(BadInputError):
    """An image whose header declares more pixels than the decoder is allowed to allocate."""


class IndexDamagedError(SimsearchError):
    """A file of the index folder is unreadable or inconsistent; the message says how to repair it."""


class IndexBusyError(SimsearchError):
    """Another process is writing to the index (a build, localize or train-localizer run)."""


class ExportTooLargeError(BadInputError):
    """A download of results whose files add up to more than the server allows in one archive."""
