from qgseg.cli import main

main()
