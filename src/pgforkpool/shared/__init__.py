"""What several pgforkpool roles use: codec, configuration, fd passing, authentication, status."""

__version__ = "0.1.0"
