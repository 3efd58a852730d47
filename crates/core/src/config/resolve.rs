//! Evaluating parameters for one tensor (stub: to be implemented).
