from dve_repro.cli import main

main()
