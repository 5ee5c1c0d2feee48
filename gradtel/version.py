"""gradtel's version, in a module of its own: the exporter names its meter with it, and importing the package's
``__init__`` from there would be an import cycle."""

__version__ = "0.1.0"
