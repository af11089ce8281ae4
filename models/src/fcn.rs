//! FCN-8s (Long et al. 2015) on a VGG-16 backbone, with a compact fully-convolutional head.
//!
//! At α = 1: VGG-16's 13 convolutions (3×3, "same") in blocks of 2, 2, 3, 3, 3 with
//! 64, 128, 256, 512, 512 channels, each block followed by a 2×2 max-pool (pool3 at /8,
//! pool4 at /16, pool5 at /32); fc6 as a 3×3 conv to 4096 channels and fc7 as a 1×1 conv to
//! 512 channels (both with ReLU; the original 7×7 fc6 with 4096-channel fc7 would give
//! log10 P ≈ 8.13, far from the paper's 7.552); 1×1 score layers on fc7, pool4 and pool3;
//! learnable transposed convolutions ×2 (4×4, stride 2), ×2 (4×4, stride 2) and ×8
//! (16×16, stride 8) between the score layers, fused by addition (the FCN-8s skip
//! architecture). 35,693,388 parameters for 1 input channel and 2 classes
//! (log10 P = 7.5525; the paper gives 7.552). Input sides must be multiples of 32.

use crate::builder::Builder;
use crate::ModelError;

const BLOCKS: [(u32, usize); 5] = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)];
const FC6: u32 = 4096;
const FC7: u32 = 512;

pub(crate) fn build(b: &mut Builder) -> Result<(), ModelError> {
    let mut x = b.input();
    let mut pools = [0; 5];
    for (i, &(w, n)) in BLOCKS.iter().enumerate() {
        let y = b.conv_block(x, w, n)?;
        x = b.pool(y);
        pools[i] = x;
    }
    let fc6 = b.conv_relu(x, FC6, 3)?;
    let fc7 = b.conv_relu(fc6, FC7, 1)?;
    let k = b.classes;
    let score_fr = b.conv(fc7, k, 1);
    let up2 = b.up(score_fr, k, 4, 2, 1);
    let score_pool4 = b.conv(pools[3], k, 1);
    let fuse4 = b.add(up2, score_pool4);
    let up4 = b.up(fuse4, k, 4, 2, 1);
    let score_pool3 = b.conv(pools[2], k, 1);
    let fuse3 = b.add(up4, score_pool3);
    let logits = b.up(fuse3, k, 16, 8, 4);
    b.argmax(logits);
    Ok(())
}
