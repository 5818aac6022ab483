//! Temporary PostgreSQL clusters from the installed server binaries (for `accord demo` and tests).
