"""The one exception type users see: a clear message naming the file, tensor or field at fault.

Every layer raises `QError` for bad input; the CLIs print its message on one line and exit 1.
"""


class QError(Exception):
    """Bad input or an unusable artifact; the message is shown to the user as-is."""
