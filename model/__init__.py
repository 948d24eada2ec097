"""hsc.model."""
