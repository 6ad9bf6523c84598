//! Backend conformance suites (feature `testing`).
