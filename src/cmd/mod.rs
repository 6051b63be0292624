//! One module per subcommand.

pub mod infer;
