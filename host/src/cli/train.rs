//! `ccnet train`: not implemented yet.

use clap::Args;

use crate::NotImplemented;

/// Arguments of `ccnet train` (not implemented yet).
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Arguments (the command is not implemented yet).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub rest: Vec<String>,
}

/// Runs `ccnet train`.
pub fn run(_a: &TrainArgs) -> anyhow::Result<()> {
    Err(NotImplemented("ccnet train").into())
}
