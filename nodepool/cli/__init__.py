"""The ``nodepool`` command line."""
