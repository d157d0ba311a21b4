"""Pipeline: the SACPO stage graph, manifest, skip and resume."""
