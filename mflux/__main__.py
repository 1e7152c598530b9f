from mflux.cli import main

main()
