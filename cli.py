"""`python cli.py ...` works like the `simsearch` console script."""
from simsearch.cli import main

if __name__ == "__main__":
    main()
