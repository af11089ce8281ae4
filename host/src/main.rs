//! The `ccnet` binary.

fn main() -> std::process::ExitCode {
    ccnet_host::cli::main()
}
