"""Command-line interface: ``properlm <command>``; one module per command."""
