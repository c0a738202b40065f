"""Generated protobuf and gRPC stubs of the SpecKV wire contract (`protos/speckv`)."""
