//! Example firmware for QEMU's `mps2-an386` (Cortex-M4F): runs the embedded models on the
//! embedded test image with `ccnet-device`, prints each mask's checksum (CRC-32) and the
//! arena high-water mark over semihosting, and exits non-zero when a checksum differs
//! from the one the host computed for the same bytes.
//!
//! The models, image and expected checksums come from `$CCNET_FIXTURE_DIR/fixture.rs`,
//! written by `cargo xtask qemu` (a U-Net in f16 and int8 with deterministic weights) or
//! by `cargo xtask build-for-budget --firmware` (the trained, packed model and a crop of
//! a dataset image).
#![no_std]
#![no_main]
#![deny(unsafe_code)]

use ccnet_device::{Input, InputData, Model};
use ccnet_shared::format::CRC32;
use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hprintln};

/// `HEIGHT`, `WIDTH`, `ARENA` (bytes), `IMAGE` (planar pixels) and `MODELS` (name,
/// container bytes, expected mask CRC-32).
mod fixture {
    include!(concat!(env!("CCNET_FIXTURE_DIR"), "/fixture.rs"));
}
use fixture::IMAGE;

/// Byte painted over the arena before a run, to measure how much of it the run touched.
const PAINT: u8 = 0xA5;
const PIXELS: usize = (fixture::HEIGHT * fixture::WIDTH) as usize;

#[entry]
fn main() -> ! {
    let mut arena = [PAINT; fixture::ARENA];
    let mut mask = [0u8; PIXELS];
    let mut ok = true;
    for &(name, bytes, expected) in fixture::MODELS {
        ok &= check(name, bytes, expected, &mut arena, &mut mask);
    }
    hprintln!(
        "{}",
        if ok {
            "qemu: all masks match"
        } else {
            "qemu: MISMATCH"
        }
    );
    debug::exit(if ok {
        debug::EXIT_SUCCESS
    } else {
        debug::EXIT_FAILURE
    });
    #[allow(clippy::empty_loop)]
    loop {}
}

fn check(name: &str, bytes: &[u8], expected: u32, arena: &mut [u8], mask: &mut [u8]) -> bool {
    arena.fill(PAINT);
    let model = match Model::parse(bytes) {
        Ok(m) => m,
        Err(e) => {
            hprintln!("{}: model rejected: {}", name, e);
            return false;
        }
    };
    let input = Input {
        data: InputData::Pixels(IMAGE),
        height: fixture::HEIGHT,
        width: fixture::WIDTH,
    };
    match model.run(input, arena, mask) {
        Ok(info) => {
            let crc = CRC32.checksum(mask);
            let touched = arena.iter().rposition(|&b| b != PAINT).map_or(0, |i| i + 1);
            let high_water = touched.saturating_sub(info.align_skip);
            let fg = mask.iter().filter(|&&c| c == 1).count();
            hprintln!(
                "{}: {}x{} mask crc32 {:#010x} (host {:#010x}), foreground {} px; arena high-water {} B (planned {} B); model {} B",
                name,
                fixture::WIDTH,
                fixture::HEIGHT,
                crc,
                expected,
                fg,
                high_water,
                info.planned_bytes,
                bytes.len()
            );
            crc == expected
        }
        Err(e) => {
            hprintln!("{}: run failed: {}", name, e);
            false
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    hprintln!("panic: {}", info);
    debug::exit(debug::EXIT_FAILURE);
    #[allow(clippy::empty_loop)]
    loop {}
}
