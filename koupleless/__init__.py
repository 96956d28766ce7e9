"""Shared kernel of the Koupleless module controller: names, the module model, the arklet codec and the kube layer."""

__version__ = "0.1.0"
