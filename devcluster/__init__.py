"""devcluster component of the Koupleless module controller."""
