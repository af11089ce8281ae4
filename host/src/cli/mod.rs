//! The `ccnet` command line: one module per subcommand, shared value parsers in
//! [`values`].

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod arch;
pub mod calibrate;
pub mod complexity;
pub mod crops;
pub mod eval;
pub mod experiment;
pub mod pack;
pub mod segment;
pub mod select;
pub mod train;
pub mod validate;
pub mod values;

/// ccnet: complexity-guided compression of biomedical segmentation networks.
#[derive(Debug, Parser)]
#[command(name = "ccnet", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Parameters, MACs and memory of an architecture at a width multiplier.
    Arch(arch::ArchArgs),
    /// Image complexity of datasets (J, B, JB and the other candidate measures).
    Complexity(complexity::ComplexityArgs),
    /// Train a width-scaled network on a dataset.
    Train(train::TrainArgs),
    /// Evaluate a trained run or a packed model on a dataset (F1, IU, latency).
    Eval(eval::EvalArgs),
    /// Fit the accuracy-vs-size model of an architecture across datasets.
    Calibrate(calibrate::CalibrateArgs),
    /// Choose the width multiplier for a dataset and a constraint.
    Select(select::SelectArgs),
    /// Quantize and pack a trained run into a container that fits a byte budget.
    Pack(pack::PackArgs),
    /// Cut one large annotated image into a dataset of square crops.
    Crops(crops::CropsArgs),
    /// Leave-one-dataset-out validation of a calibration and the paper's case-1 check.
    Validate(validate::ValidateArgs),
    /// Segment images offline with a packed model on the device engine (no GPU, no network).
    Segment(segment::SegmentArgs),
    /// The paper's comparison: base, squeezed, pruned and CC-Net networks (Tables 2, 3).
    Experiment(experiment::ExperimentArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Arch(a) => arch::run(&a),
        Command::Complexity(a) => complexity::run(&a),
        Command::Train(a) => train::run(&a),
        Command::Eval(a) => eval::run(&a),
        Command::Calibrate(a) => calibrate::run(&a),
        Command::Select(a) => select::run(&a),
        Command::Pack(a) => pack::run(&a),
        Command::Crops(a) => crops::run(&a).map(|_| ()),
        Command::Segment(a) => segment::run(&a),
        Command::Validate(a) => validate::run(&a),
        Command::Experiment(a) => experiment::run(&a),
    }
}

/// Entry point of the binary: parses arguments, runs, prints errors with their causes.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
