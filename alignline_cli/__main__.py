"""`python -m alignline_cli` runs the `alignline` command."""

from alignline_cli.main import main

main()
