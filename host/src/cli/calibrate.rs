//! `ccnet calibrate`: not implemented yet.

use clap::Args;

use crate::NotImplemented;

/// Arguments of `ccnet calibrate` (not implemented yet).
#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// Arguments (the command is not implemented yet).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub rest: Vec<String>,
}

/// Runs `ccnet calibrate`.
pub fn run(_a: &CalibrateArgs) -> anyhow::Result<()> {
    Err(NotImplemented("ccnet calibrate").into())
}
