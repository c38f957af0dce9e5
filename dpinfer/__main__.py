from dpinfer.cli import main

main()
