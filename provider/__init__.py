"""provider component of the Koupleless module controller."""
