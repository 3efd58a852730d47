//! One module per subcommand.

pub mod bench;
pub mod demo;
pub mod generate;
pub mod inspect;
pub mod merge;
pub mod methods;
