//! `ccnet eval`: not implemented yet.

use clap::Args;

use crate::NotImplemented;

/// Arguments of `ccnet eval` (not implemented yet).
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Arguments (the command is not implemented yet).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub rest: Vec<String>,
}

/// Runs `ccnet eval`.
pub fn run(_a: &EvalArgs) -> anyhow::Result<()> {
    Err(NotImplemented("ccnet eval").into())
}
