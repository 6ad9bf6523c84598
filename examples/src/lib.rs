//! The projects service and benchmarks of KES (work in progress).
