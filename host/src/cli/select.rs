//! `ccnet select`: not implemented yet.

use clap::Args;

use crate::NotImplemented;

/// Arguments of `ccnet select` (not implemented yet).
#[derive(Debug, Args)]
pub struct SelectArgs {
    /// Arguments (the command is not implemented yet).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub rest: Vec<String>,
}

/// Runs `ccnet select`.
pub fn run(_a: &SelectArgs) -> anyhow::Result<()> {
    Err(NotImplemented("ccnet select").into())
}
