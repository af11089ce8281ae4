//! Project automation: `cargo xtask <task>`. One module per task; cargo is called
//! through `$CARGO` so the same toolchain runs everything.

mod build_for_budget;
mod cuda_check;
mod firmware;
mod qemu;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <task> [args]

tasks:
  build-for-budget BUDGET [options]   dataset in, packed model + report out (e.g. 1MB)
  qemu                                 build the Cortex-M4 example firmware and run it in QEMU
  cuda-check [--cache DIR]             set up a CUDA toolchain (wheels + libcuda stub), build the
                                       `cuda` feature, and check --device cuda (GPU run or clean error)
  help                                 this text
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = match args.split_first() {
        Some((t, r)) => (t.as_str(), r),
        None => {
            eprint!("{USAGE}");
            return ExitCode::FAILURE;
        }
    };
    let result = match task {
        "build-for-budget" => build_for_budget::run(rest),
        "qemu" => qemu::run(rest),
        "cuda-check" => cuda_check::run(rest),
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown task `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The cargo that runs this xtask.
#[allow(dead_code)]
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}
