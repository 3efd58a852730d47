//! The `amalgam` binary.
fn main() {}
