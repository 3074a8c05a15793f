"""sparse-to-dense: spend sparse verifiable reward on a teacher, move it into a student with dense KL."""

__version__ = "0.1.0"
