//! Cluster membership, expert placement (TEP / DEP / AFD) and the etcd and in-memory discovery backends.
//! It lands with the cluster issue.
