"""hsc.training."""
