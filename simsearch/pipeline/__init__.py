"""Files in, vectors out: read folders and annotations, embed images, build an index (read -> embed -> build)."""
