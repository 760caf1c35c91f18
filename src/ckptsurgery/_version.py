"""The package's version, in a module of its own so that modules inside the package can import
it without going through the package's ``__init__``."""

__version__ = "0.1.0"
