"""The package version, in a module of its own so that modules inside the package (the artifact writer's
``creator`` field, ``deepsqueeze --version``) read it without importing the package's public API."""

__version__ = "0.1.0"
