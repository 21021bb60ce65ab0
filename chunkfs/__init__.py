"""chunkfs: a chunked, content-addressed POSIX filesystem for ML model weights."""

__version__ = "0.1.0"
