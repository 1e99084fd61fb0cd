"""CLI commands, one module per verb; ``vitc.cli`` assembles them into one typer app."""
