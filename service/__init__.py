"""hsc.service."""
