//! A U-Net decoder's up-convolution (kernel = stride, no padding, bias) and its
//! concatenation behind the skip connection as one autograd op.
//!
//! As separate ops the up-convolution's output and its bias-added copy are
//! intermediates: candle's backward pass gives each a zero-filled gradient slot and adds
//! the incoming gradient into it, and the concatenation's backward adds strided halves of
//! its gradient into two more. [`UpCatOp`] writes the skip connection's planes and the
//! biased up-convolution straight into the concatenated output, and its backward pass
//! reads the two halves of the gradient in place.

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::conv::{shuffle_gather, shuffle_scatter, upconv_grads, upconv_rows};
use super::cpu_data::{contiguous_f32, min_items, with_f32};

/// `cat([skip, up(x, w) + b], 1)` on `(skip, x, w ‖ b)`: `skip` `(N, Cs, H·s, W·s)`,
/// `x` `(N, Cin, H, W)`, the third argument the flattened weights `(Cin, Cout, s, s)`
/// followed by the `Cout` biases.
#[derive(Clone, Copy, Debug)]
pub struct UpCatOp {
    pub stride: usize,
    pub cout: usize,
}

impl CustomOp3 for UpCatOp {
    fn name(&self) -> &'static str {
        "ccnet-upconv-cat"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (s, cout) = (self.stride, self.cout);
        let skip = contiguous_f32(s1, l1, "upconv + cat: the skip connection")?;
        let x = contiguous_f32(s2, l2, "upconv + cat: the input")?;
        let wb = contiguous_f32(s3, l3, "upconv + cat: the weights and biases")?;
        let (&[n, cs, ho, wo], &[xn, cin, h, w]) = (l1.dims(), l2.dims()) else {
            candle_core::bail!("upconv + cat: shapes {:?} {:?}", l1.dims(), l2.dims());
        };
        let k = cout * s * s;
        if s == 0 || xn != n || ho != h * s || wo != w * s || wb.len() != cin * k + cout {
            candle_core::bail!(
                "upconv + cat: shapes {:?} {:?} {:?} do not match stride {s}, {cout} channels",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let (hw, plane, c) = (h * w, ho * wo, cs + cout);
        let (wv, bias) = wb.split_at(cin * k);
        let z = upconv_rows(x, wv, (n, cin, hw), k)?;
        let mut y = vec![0f32; n * c * plane];
        with_f32(&z, |z| {
            y.par_chunks_mut(plane)
                .with_min_len(min_items(plane))
                .enumerate()
                .for_each(|(idx, dst)| {
                    let (img, ch) = (idx / c, idx % c);
                    if ch < cs {
                        let src = (img * cs + ch) * plane;
                        dst.copy_from_slice(&skip[src..src + plane]);
                    } else {
                        let co = ch - cs;
                        let rows = (img * cout + co) * s * s * hw;
                        shuffle_scatter(s, h, w, &z[rows..rows + s * s * hw], dst);
                        let b = bias[co];
                        dst.iter_mut().for_each(|v| *v += b);
                    }
                })
        })?;
        Ok((CpuStorage::F32(y), Shape::from((n, c, ho, wo))))
    }

    fn bwd(
        &self,
        skip: &Tensor,
        x: &Tensor,
        wb: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (s, cout) = (self.stride, self.cout);
        let (n, cs, ho, wo) = skip.dims4()?;
        let (_, cin, h, w) = x.dims4()?;
        let (hw, plane, c, k) = (h * w, ho * wo, cs + cout, cout * s * s);
        let grad = grad.contiguous()?;
        let (dskip, g, db) = with_f32(&grad, |gr| {
            let dskip: Option<Vec<f32>> = skip.track_op().then(|| {
                let mut d = vec![0f32; n * cs * plane];
                d.par_chunks_mut(cs * plane)
                    .enumerate()
                    .for_each(|(img, dst)| {
                        let src = img * c * plane;
                        dst.copy_from_slice(&gr[src..src + cs * plane]);
                    });
                d
            });
            // The up-convolution's half, gathered into rows, and its per-plane sums.
            let mut g = vec![0f32; n * k * hw];
            let sums: Vec<f64> = g
                .par_chunks_mut(s * s * hw)
                .with_min_len(min_items(plane))
                .enumerate()
                .map(|(idx, dst)| {
                    let (img, co) = (idx / cout, idx % cout);
                    let src = &gr[(img * c + cs + co) * plane..][..plane];
                    shuffle_gather(s, h, w, src, dst);
                    src.iter().map(|&v| f64::from(v)).sum::<f64>()
                })
                .collect();
            let mut db = vec![0f64; cout];
            for (idx, v) in sums.iter().enumerate() {
                db[idx % cout] += v;
            }
            (dskip, g, db)
        })?;
        let wt = wb.narrow(0, 0, cin * k)?.reshape((cin, cout, s, s))?;
        let (dx, dw) = upconv_grads(x, &wt, g, s)?;
        let db: Vec<f32> = db.iter().map(|&v| v as f32).collect();
        let dwb = Tensor::cat(
            &[dw.flatten_all()?, Tensor::from_vec(db, cout, &Device::Cpu)?],
            0,
        )?;
        let dskip = match dskip {
            Some(d) => Some(Tensor::from_vec(d, (n, cs, ho, wo), &Device::Cpu)?),
            None => None,
        };
        Ok((dskip, dx, Some(dwb)))
    }
}

/// `cat([skip, conv_transpose2d(x, w, stride = kernel) + b], 1)` as one [`UpCatOp`]:
/// `w` `(Cin, Cout, s, s)`, `b` `[Cout]`.
pub fn upconv_cat(
    skip: &Tensor,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    stride: usize,
) -> Result<Tensor> {
    let (cin, cout, kh, kw) = w.dims4()?;
    if kh != stride || kw != stride || b.dims() != [cout] || x.dim(1)? != cin {
        bail!(
            "upconv + cat: weights {:?}, bias {:?}, input {:?}, stride {stride}",
            w.dims(),
            b.dims(),
            x.dims()
        );
    }
    let wb = Tensor::cat(&[&w.flatten_all()?, b], 0)?;
    Ok(skip.contiguous()?.apply_op3(
        &x.contiguous()?,
        &wb.contiguous()?,
        UpCatOp { stride, cout },
    )?)
}
