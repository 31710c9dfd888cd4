"""The one exception type of the data pipeline."""


class DataError(ValueError):
    """Bad data input: the message is one line naming the file (and line or record) at fault."""
