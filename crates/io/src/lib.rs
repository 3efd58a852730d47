//! amalgam-io: checkpoint I/O (stub).
