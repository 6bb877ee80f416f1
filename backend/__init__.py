"""pgforkpool backend role."""
