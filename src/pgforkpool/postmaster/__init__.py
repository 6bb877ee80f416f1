"""pgforkpool postmaster role."""
