from simsearch.cli import main

main()
