"""`python -m eum`: the `eum` command."""

from eum.cli import main

main()
