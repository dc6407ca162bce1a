"""Scores: SSH mapping data-challenge metrics, ensemble scores."""
