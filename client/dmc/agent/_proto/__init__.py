"""Generated gRPC code for the SPIFFE Workload API (scripts/gen-proto.sh; do not edit).

Import it only in the agent: the standard's proto has no package, so this copy and the
``spiffe`` package's cannot be loaded in one process (DEPENDENCIES.md).
"""
