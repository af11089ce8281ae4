//! CUMedVision (Chen et al. 2016, the deep contextual network) with "same" padding.
//!
//! At α = 1: a VGG-style down-sampling path of 3×3 conv + ReLU blocks with
//! 64×2, 128×2, 256×3 and 512×3 channels and a 2×2 max-pool between blocks (levels at
//! /1, /2, /4, /8); three auxiliary branches on the outputs of the 128-, 256- and
//! 512-channel blocks, each a 1×1 classifier to `classes` followed by a learnable
//! transposed convolution back to full resolution (×2: 4×4 stride 2; ×4: 8×8 stride 4;
//! ×8: 16×16 stride 8); the fused output is the sum of the three branches (the contextual
//! fusion of the paper). 7,637,260 parameters for 1 input channel and 2 classes
//! (log10 P = 6.8829; the paper gives 6.887). Input sides must be multiples of 8.

use crate::builder::Builder;
use crate::ModelError;

const BLOCKS: [(u32, usize); 4] = [(64, 2), (128, 2), (256, 3), (512, 3)];

pub(crate) fn build(b: &mut Builder) -> Result<(), ModelError> {
    let mut x = b.input();
    let k = b.classes;
    let mut fused = None;
    for (level, &(w, n)) in BLOCKS.iter().enumerate() {
        if level > 0 {
            x = b.pool(x);
        }
        x = b.conv_block(x, w, n)?;
        if level > 0 {
            let factor = 1u16 << level; // 2, 4, 8
            let score = b.conv(x, k, 1);
            let up = b.up(score, k, 2 * factor, factor, factor / 2);
            fused = Some(match fused {
                None => up,
                Some(f) => b.add(f, up),
            });
        }
    }
    let logits = fused.expect("three branches");
    b.argmax(logits);
    Ok(())
}
