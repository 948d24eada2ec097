"""hsc.core."""
