"""Data that simsearch makes: composites with exact boxes, and the offline demo photos."""
