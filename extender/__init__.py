"""extender component of the Koupleless module controller."""
