"""Generated gRPC/protobuf code for loraquilt.v1 (regenerate with `bash proto/generate.sh`)."""
