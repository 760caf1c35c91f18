from ckptsurgery.cli import main

main()
