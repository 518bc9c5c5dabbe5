"""Subcommands of the `edgequant` CLI, one module each (see edgequant.cli)."""
