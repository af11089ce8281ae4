//! Parse + run with arbitrary model bytes, input sizes and values, arena and mask sizes.
//!
//! Layout of a fuzz input:
//!
//! | bytes | meaning |
//! |---|---|
//! | 0 | flags: bit 0 recompute the container CRC (so mutations reach the header and graph checks), bit 1 tiled run, bit 2 reference kernels, bit 3 `f32` input instead of pixels, bit 4 arena size from byte 4..6 instead of the planned size, bit 5 odd (misaligned) arena start |
//! | 1 | input height (`% 97`) |
//! | 2 | input width (`% 97`) |
//! | 3 | seed of the input values (`f32` inputs include NaN, infinities, huge values) |
//! | 4..6 | arena: signed delta to the planned size, or an absolute size with flag bit 4 |
//! | 6 | mask length delta (signed) |
//! | 7 | input length delta (signed) |
//! | 8.. | the model bytes (copied to a 16-byte aligned buffer) |
#![no_main]

use ccnet_device::{Input, InputData, Kernels, Model};
use ccnet_shared::format::{CRC32, CRC_LEN};
use libfuzzer_sys::fuzz_target;

/// Largest arena, mask or input a case may allocate (keeps each execution fast).
const CAP: usize = 4 << 20;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn resize(base: usize, delta: i8) -> Option<usize> {
    let n = base as i64 + i64::from(delta);
    if n < 0 || n as usize > CAP {
        None
    } else {
        Some(n as usize)
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (ctl, body) = data.split_at(8);
    let flags = ctl[0];
    let h = u32::from(ctl[1]) % 97;
    let w = u32::from(ctl[2]) % 97;
    let arena_ctl = i16::from_le_bytes([ctl[4], ctl[5]]);
    let mask_delta = ctl[6] as i8;
    let input_delta = ctl[7] as i8;

    // 16-byte aligned copy of the model, as a device holds it in flash.
    let mut words = vec![0u128; body.len().div_ceil(16)];
    let bytes = &mut bytemuck_cast(&mut words)[..body.len()];
    bytes.copy_from_slice(body);
    if flags & 1 != 0 && bytes.len() > CRC_LEN {
        let end = bytes.len() - CRC_LEN;
        let crc = CRC32.checksum(&bytes[..end]);
        bytes[end..].copy_from_slice(&crc.to_le_bytes());
    }
    let bytes: &[u8] = bytes;
    let Ok(mut model) = Model::parse(bytes) else {
        return;
    };
    if flags & 4 != 0 {
        model.set_kernels(Kernels::Reference);
    }
    let tiled = flags & 2 != 0;
    let planned = if tiled {
        model.tiled_arena_bytes(h, w)
    } else {
        model.arena_bytes(h, w)
    };
    let arena_len = if flags & 16 != 0 {
        Some(arena_ctl as u16 as usize * 64)
    } else {
        match planned {
            Ok(p) => resize(p, (arena_ctl % 128) as i8),
            // Not runnable at this size: still call run with a small arena.
            Err(_) => Some(256),
        }
    };
    let Some(arena_len) = arena_len.filter(|&n| n <= CAP) else {
        return;
    };
    let channels = model.graph().input_channels() as usize;
    let Some(input_len) = resize(channels * (h as usize) * (w as usize), input_delta) else {
        return;
    };
    let Some(mask_len) = resize((h as usize) * (w as usize), mask_delta) else {
        return;
    };
    let mut rng = Rng(u64::from(ctl[3]).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let pixels: Vec<u8>;
    let floats: Vec<f32>;
    let data = if flags & 8 != 0 {
        floats = (0..input_len)
            .map(|_| {
                let r = rng.next();
                match r % 8 {
                    0 => f32::from_bits((r >> 32) as u32),
                    1 => [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, -0.0]
                        [(r >> 8) as usize % 5],
                    _ => ((r >> 40) as f32 / (1u64 << 23) as f32) - 1.0,
                }
            })
            .collect();
        InputData::F32(&floats)
    } else {
        pixels = (0..input_len).map(|_| (rng.next() >> 56) as u8).collect();
        InputData::Pixels(&pixels)
    };
    let input = Input {
        data,
        height: h,
        width: w,
    };
    // Arena buffer, optionally starting at an odd address.
    let skew = usize::from(flags & 32 != 0);
    let mut arena_buf = vec![0u128; (arena_len + skew).div_ceil(16)];
    let arena = &mut bytemuck_cast(&mut arena_buf)[skew..skew + arena_len];
    let mut mask = vec![0u8; mask_len];
    let result = if tiled {
        model.run_tiled(input, arena, &mut mask)
    } else {
        model.run(input, arena, &mut mask)
    };
    let _ = result;
});

fn bytemuck_cast(words: &mut [u128]) -> &mut [u8] {
    bytemuck::cast_slice_mut(words)
}
