//! Exact selection (stub: to be implemented).
