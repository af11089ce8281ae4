//! Host-native latency of the device engine on one thread:
//! `cargo run -p ccnet-device --release --example bench -- MODEL.ccn [SIDE] [RUNS]`
//! (for example the fixture `cargo xtask qemu` writes to `target/qemu-fixture/`).

use std::time::Instant;

use ccnet_device::{Input, InputData, Kernels, Model};

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().ok_or("usage: bench MODEL.ccn [SIDE] [RUNS]")?;
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
    let mut arena = vec![0u8; model.arena_bytes(side, side).map_err(|e| e.to_string())?];
    let mut mask = vec![0u8; n];
    for (name, kernels) in [("fast", Kernels::Fast), ("reference", Kernels::Reference)] {
        model.set_kernels(kernels);
        let mut times = Vec::new();
        let reps = if kernels == Kernels::Fast {
            runs
        } else {
            runs.min(3)
        };
        for _ in 0..reps + 1 {
            let input = Input {
                data: InputData::Pixels(&image),
                height: side,
                width: side,
            };
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
    Ok(())
}
