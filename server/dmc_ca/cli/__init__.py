"""The `dmc-ca` and `dmc-admin` commands (SPEC §6)."""
