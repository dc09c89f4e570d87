"""Built-in model plugins, one diffusers family per file (installed as causalize.plugins)."""
