"""Scores, masks and argument checks: the building blocks every layer above uses."""
