"""The gRPC sidecar (needs grpcio): ``distillguard serve --config FILE``."""
