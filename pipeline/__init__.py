"""Pipeline machinery: config, stages, manifests, artifact I/O, runtime, metrics."""
