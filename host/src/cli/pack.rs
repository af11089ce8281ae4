//! `ccnet pack`: not implemented yet.

use clap::Args;

use crate::NotImplemented;

/// Arguments of `ccnet pack` (not implemented yet).
#[derive(Debug, Args)]
pub struct PackArgs {
    /// Arguments (the command is not implemented yet).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub rest: Vec<String>,
}

/// Runs `ccnet pack`.
pub fn run(_a: &PackArgs) -> anyhow::Result<()> {
    Err(NotImplemented("ccnet pack").into())
}
