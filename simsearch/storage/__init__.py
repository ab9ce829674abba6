"""What an index folder holds: SQLite records, the FAISS file, the folder layout and its writer lock."""
