"""The causalize command line (installed as causalize.cli); see causalize.cli.app."""
