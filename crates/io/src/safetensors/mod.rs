//! The safetensors format: header parsing and validation ([`header`]), the validated reader
//! ([`read`]), and the streaming sharded writer ([`write`]).

pub(crate) mod header;
pub mod read;
pub mod sink;
pub mod write;
