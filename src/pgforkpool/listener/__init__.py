"""pgforkpool listener role."""
