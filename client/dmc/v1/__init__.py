"""Generated gRPC code for the dmc.v1 API (scripts/gen-proto.sh; do not edit)."""
