"""Figures (matplotlib, Agg backend): quick-looks, scores, validation reports."""
