"""The domain layer: plain Python rules over the store, no gRPC and no protobuf."""
