"""webhook component of the Koupleless module controller."""
