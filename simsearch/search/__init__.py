"""Neighbours of an image, a record or a vector: the one search path every view uses."""
