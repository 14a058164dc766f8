"""The ``nodepool`` command line."""

import os

# gRPC's C core writes log lines of its own to the terminal (a failed handshake, an invalid
# key, a port it cannot bind) and reads GRPC_VERBOSITY once, when grpc is imported. The
# commands report those failures as one line that says what to do, so the core stays quiet
# unless GRPC_VERBOSITY (ERROR, INFO, DEBUG) asks for it.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
