//! Host-native latency of the device engine on one thread:
//! `cargo run -p ccnet-device --release --example bench -- MODEL.ccn [SIDE] [RUNS] [--profile]`
//! (for example the fixture `cargo xtask qemu` writes to `target/qemu-fixture/`, or the
//! U-Nets `device/benches/latency_compare.py` writes to `target/latency-compare/`).
//!
//! `--profile` adds a per-node breakdown of the fast kernels: node `i` costs the
//! difference of the minimum times of [`Model::run_node`] up to `i` and up to the node
//! before it (run_node runs only the nodes its target depends on, so the difference is
//! the node's own cost for a chain; a U-Net's nodes all depend on their predecessor).

use std::time::Instant;

use ccnet_device::{Input, InputData, Kernels, Model};
use ccnet_shared::graph::Op;

fn main() -> Result<(), String> {
    let all: Vec<String> = std::env::args().skip(1).collect();
    let profile = all.iter().any(|a| a == "--profile");
    let args: Vec<&String> = all.iter().filter(|a| *a != "--profile").collect();
    let path = args
        .first()
        .ok_or("usage: bench MODEL.ccn [SIDE] [RUNS] [--profile]")?;
    let side: u32 = args
        .get(1)
        .map_or(Ok(256), |s| s.parse())
        .map_err(|e| format!("{e}"))?;
    let runs: usize = args
        .get(2)
        .map_or(Ok(20), |s| s.parse())
        .map_err(|e| format!("{e}"))?;
    let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    let mut model = Model::parse(&bytes).map_err(|e| e.to_string())?;
    let c = model.graph().input_channels();
    let n = (side * side) as usize;
    let image: Vec<u8> = (0..c as usize * n)
        .map(|i| ((i * 37) % 251) as u8)
        .collect();
    let input = Input {
        data: InputData::Pixels(&image),
        height: side,
        width: side,
    };
    let mut arena = vec![0u8; model.arena_bytes(side, side).map_err(|e| e.to_string())?];
    let mut mask = vec![0u8; n];
    for (name, kernels) in [("fast", Kernels::Fast), ("reference", Kernels::Reference)] {
        model.set_kernels(kernels);
        let reps = if kernels == Kernels::Fast {
            runs
        } else {
            runs.min(3)
        };
        let mut times = Vec::new();
        for _ in 0..reps + 1 {
            let t = Instant::now();
            model
                .run(input, &mut arena, &mut mask)
                .map_err(|e| e.to_string())?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.remove(0);
        times.sort_by(|a, b| a.total_cmp(b));
        println!(
            "{name:>9} kernels, {side}x{side}, {:?}: min {:.2} ms, median {:.2} ms over {reps} runs; arena {} B",
            model.precision(),
            times[0],
            times[times.len() / 2],
            arena.len()
        );
    }
    if profile {
        model.set_kernels(Kernels::Fast);
        breakdown(&model, input, &mut arena, runs)?;
    }
    Ok(())
}

/// Per-node cost from cumulative [`Model::run_node`] timings (median of `runs`).
fn breakdown(
    model: &Model<'_>,
    input: Input<'_>,
    arena: &mut [u8],
    runs: usize,
) -> Result<(), String> {
    let graph = model.graph();
    let nodes = graph.nodes();
    let (side_h, side_w) = (input.height, input.width);
    let plan = model.plan(side_h, side_w).map_err(|e| e.to_string())?;
    let mut prev = 0.0;
    let mut total = 0.0;
    println!("\nper-node breakdown (fast kernels; cumulative run_node minima, differences):");
    println!(
        "{:>4}  {:<16} {:>16} {:>9} {:>8} {:>10}",
        "node", "op", "output", "MMACs", "ms", "GMAC/s"
    );
    for (i, op) in nodes.iter().enumerate() {
        let shape = plan.shape(i as u16).ok_or("no shape")?;
        let mut out = vec![0f32; shape.elements() as usize];
        let mut times = Vec::new();
        for _ in 0..runs.max(3) + 1 {
            let t = Instant::now();
            model
                .run_node(input, arena, i as u16, &mut out)
                .map_err(|e| e.to_string())?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.remove(0);
        // The minimum: the least disturbed by other work on a shared machine.
        let med = times.iter().copied().fold(f64::INFINITY, f64::min);
        let own = (med - prev).max(0.0);
        prev = med;
        total += own;
        let macs = match op {
            Op::Conv2d(c) => {
                u64::from(c.in_channels * c.out_channels)
                    * u64::from(c.kernel).pow(2)
                    * u64::from(shape.h * shape.w)
            }
            Op::ConvTranspose2d(c) => {
                u64::from(c.in_channels * c.out_channels)
                    * u64::from(c.kernel).pow(2)
                    * u64::from(shape.h * shape.w)
                    / u64::from(c.stride).pow(2)
            }
            _ => 0,
        };
        let gmacs = if macs > 0 && own > 0.0 {
            format!("{:.1}", macs as f64 / own / 1e6)
        } else {
            String::new()
        };
        println!(
            "{i:>4}  {:<16} {:>16} {:>9.2} {:>8.3} {:>10}",
            op.kind(),
            format!("{}x{}x{}", shape.c, shape.h, shape.w),
            macs as f64 / 1e6,
            own,
            gmacs
        );
    }
    println!(
        "sum of node costs: {total:.2} ms (the last run_node includes reading its output back)"
    );
    Ok(())
}
