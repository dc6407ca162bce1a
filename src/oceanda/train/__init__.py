"""Training loops: single process and data-parallel over ranks."""
