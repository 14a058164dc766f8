"""Generated protocol code for package ``nodepool.v1`` (see ``protos/``)."""
