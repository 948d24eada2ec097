"""hsc.worker."""
