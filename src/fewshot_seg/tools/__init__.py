"""Small command-line tools (aggregate results, ...)."""
