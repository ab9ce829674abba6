"""Neighbours of an image, a record or a vector: the one search path that the CLI, the page, pairs and the app use."""
