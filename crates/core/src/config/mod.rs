//! mergekit-compatible config model (stub: to be implemented).
