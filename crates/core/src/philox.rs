//! Philox4x32-10 counter-based RNG (stub: to be implemented).
