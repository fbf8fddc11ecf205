"""jobd: the job manager of a CIDX server."""

__version__ = "0.1.0"
