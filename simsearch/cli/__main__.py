"""`python -m simsearch.cli`: the same commands as the `simsearch` script."""
from simsearch.cli import main

main()
