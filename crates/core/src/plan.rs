//! The planner (stub: to be implemented).
