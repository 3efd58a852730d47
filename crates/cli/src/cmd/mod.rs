//! One module per subcommand.

pub mod adapters;
pub mod bench;
pub mod bench_cluster;
pub mod bench_eval;
pub mod bench_mats;
pub mod cluster;
pub mod demo;
pub mod device;
pub mod eval;
pub mod generate;
pub mod gpu_check;
pub mod inspect;
pub mod merge;
pub mod methods;
pub mod stats;
pub mod study;
