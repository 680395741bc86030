"""The version of mpsearch (``mpsearch --version``; ``mpsearch.__version__``)."""

__version__ = "0.1.0"
