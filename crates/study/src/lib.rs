//! Scaling studies (stub).
#![deny(missing_docs)]
