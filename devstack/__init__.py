"""Development and test harness: the local stack (redis-server, Tansu) and the whole-mesh
runner. Used by the tests, the demo and the benchmarks; never installed in a service image."""
