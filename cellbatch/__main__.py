from cellbatch.cli import main

main()
