//! Random tensors and their comparison, for the op tests.

use candle_core::{Device, Tensor};
use ccnet_host::train::rng::Rng;

/// A tensor of `shape` with normal values `N(offset, scale²)`.
pub fn randn(rng: &mut Rng, shape: &[usize], scale: f64, offset: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.normal() * scale + offset) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// All values of `t`, flattened.
pub fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Max |a − b| relative to max(1, max |b|).
pub fn rel_err_values(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// [`rel_err_values`] of two tensors of the same shape.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    rel_err_values(&flat(a), &flat(b))
}
