"""dmc_ca: the dmc certificate authority (CA service, etcd store, dmc-ca and dmc-admin)."""
