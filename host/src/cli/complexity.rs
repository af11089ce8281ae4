//! `ccnet complexity`: not implemented yet.

use clap::Args;

use crate::NotImplemented;

/// Arguments of `ccnet complexity` (not implemented yet).
#[derive(Debug, Args)]
pub struct ComplexityArgs {
    /// Arguments (the command is not implemented yet).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub rest: Vec<String>,
}

/// Runs `ccnet complexity`.
pub fn run(_a: &ComplexityArgs) -> anyhow::Result<()> {
    Err(NotImplemented("ccnet complexity").into())
}
