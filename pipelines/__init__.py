"""Ray jobs, configuration, storage and the CLI."""
