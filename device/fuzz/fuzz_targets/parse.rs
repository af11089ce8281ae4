//! `Model::parse` (and the container reader under it) on arbitrary bytes: never panics,
//! and whatever it accepts can be planned and queried without panicking. Each input is
//! parsed as it is and once more with its trailing CRC recomputed, so that mutations
//! reach the header, graph and tensor-table checks behind the CRC.
#![no_main]

use ccnet_device::Model;
use ccnet_shared::format::{Container, CRC32, CRC_LEN};
use libfuzzer_sys::fuzz_target;

fn check(bytes: &[u8]) {
    let _ = Container::parse(bytes);
    if let Ok(model) = Model::parse(bytes) {
        let (h, w) = model.tile_size();
        let _ = model.arena_bytes(h, w);
        let _ = model.tiled_arena_bytes(h, w);
        let _ = model.tile_plan(h.saturating_mul(3), w.saturating_mul(2));
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() > CRC_LEN {
        let mut words = vec![0u128; data.len().div_ceil(16)];
        let bytes = &mut bytemuck::cast_slice_mut::<u128, u8>(&mut words)[..data.len()];
        bytes.copy_from_slice(data);
        let end = bytes.len() - CRC_LEN;
        let crc = CRC32.checksum(&bytes[..end]);
        bytes[end..].copy_from_slice(&crc.to_le_bytes());
        check(bytes);
    }
});
