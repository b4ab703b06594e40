"""The one exception type for bad market data or bad data requests.

Messages name what was wrong and where (file, field, row, date), so the CLI can print the message
alone and exit non-zero.
"""


class DataError(ValueError):
    """Bad data, or a request the data cannot answer (dates outside the data, unknown symbol)."""
