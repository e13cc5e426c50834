"""pyqmail: a qmail-compatible mail transfer agent in Python."""

__version__ = "0.1.0"
