//! U-Net (Ronneberger et al. 2015) with "same" padding.
//!
//! At α = 1: encoder blocks of two 3×3 conv + ReLU with 64, 128, 256, 512 channels, each
//! followed by a 2×2 max-pool; a bottleneck of two 3×3 conv with 1024 channels; four
//! decoder steps of a 2×2 stride-2 transposed conv halving the channels, concatenation
//! with the encoder skip, and two 3×3 conv + ReLU; a 1×1 classifier to `classes`.
//! 23 convolutions; 31,030,658 parameters for 1 input channel and 2 classes
//! (log10 P = 7.4918; the paper gives 7.492). Input sides must be multiples of 16.

use ccnet_shared::graph::NodeId;

use crate::builder::Builder;
use crate::ModelError;

const WIDTHS: [u32; 4] = [64, 128, 256, 512];
const BOTTLENECK: u32 = 1024;

pub(crate) fn build(b: &mut Builder) -> Result<(), ModelError> {
    let mut x = b.input();
    let mut skips: [NodeId; 4] = [0; 4];
    for (i, &w) in WIDTHS.iter().enumerate() {
        let y = b.conv_block(x, w, 2)?;
        skips[i] = y;
        x = b.pool(y);
    }
    x = b.conv_block(x, BOTTLENECK, 2)?;
    for (i, &w) in WIDTHS.iter().enumerate().rev() {
        let c = b.width(w)?;
        let up = b.up(x, c, 2, 2, 0);
        let cat = b.concat(skips[i], up);
        x = b.conv_block(cat, w, 2)?;
    }
    let classes = b.classes;
    let logits = b.conv(x, classes, 1);
    b.argmax(logits);
    Ok(())
}
