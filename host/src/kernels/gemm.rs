//! Strided `f32` matrix products through the `gemm` crate (the one candle's CPU matmul
//! uses), behind a safe interface: matrices are views into slices with a row and a
//! column stride, so a product can read a band of an NCHW tensor, write straight into
//! its place in another one, or accumulate onto a gradient, without copies or fresh
//! (zeroed) allocations.

use gemm::Parallelism;

/// A read-only `rows × cols` matrix inside `data`: element `(i, j)` is
/// `data[i·rs + j·cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// A writable `rows × cols` matrix inside `data`, laid out like [`MatRef`]; distinct
/// elements never share a slot.
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// Whether the last element `(rows − 1, cols − 1)` lies inside a slice of `len`.
fn fits(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    rows == 0
        || cols == 0
        || (rows - 1)
            .checked_mul(rs)
            .zip((cols - 1).checked_mul(cs))
            .and_then(|(a, b)| a.checked_add(b))
            .is_some_and(|last| last < len)
}

impl<'a> MatRef<'a> {
    /// A strided view; panics when an element would fall outside `data`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        assert!(
            fits(data.len(), rows, cols, rs, cs),
            "gemm: a {rows}×{cols} view with strides ({rs}, {cs}) does not fit {} elements",
            data.len()
        );
        MatRef {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// A dense row-major `rows × cols` view.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }

    /// The transpose (same data, strides swapped).
    pub fn t(self) -> Self {
        MatRef {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

impl<'a> MatMut<'a> {
    /// A strided view; panics when an element would fall outside `data` or when two
    /// elements would share a slot (rows and columns must not interleave).
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        assert!(
            fits(data.len(), rows, cols, rs, cs),
            "gemm: a {rows}×{cols} view with strides ({rs}, {cs}) does not fit {} elements",
            data.len()
        );
        let distinct = rows <= 1 && (cols <= 1 || cs >= 1)
            || cols <= 1 && rs >= 1
            || cs >= 1 && rs >= cols * cs
            || rs >= 1 && cs >= rows * rs;
        assert!(
            distinct,
            "gemm: strides ({rs}, {cs}) make elements of a {rows}×{cols} view overlap"
        );
        MatMut {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// A dense row-major `rows × cols` view.
    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }
}

/// `dst = lhs · rhs`, or `dst += lhs · rhs` with `accumulate`, multithreaded over
/// rayon's pool. Panics when the shapes do not chain.
pub fn matmul(dst: MatMut<'_>, lhs: MatRef<'_>, rhs: MatRef<'_>, accumulate: bool) {
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    product(dst, lhs, rhs, accumulate, par);
}

/// [`matmul`] on the calling thread only (for callers that parallelise around it).
pub fn matmul_serial(dst: MatMut<'_>, lhs: MatRef<'_>, rhs: MatRef<'_>, accumulate: bool) {
    product(dst, lhs, rhs, accumulate, Parallelism::None);
}

fn product(dst: MatMut<'_>, lhs: MatRef<'_>, rhs: MatRef<'_>, accumulate: bool, par: Parallelism) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert!(
        rhs.rows == k && dst.rows == m && dst.cols == n,
        "gemm: ({m}×{k}) · ({}×{n}) into ({}×{})",
        rhs.rows,
        dst.rows,
        dst.cols
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst.data[i * dst.rs + j * dst.cs] = 0.0;
                }
            }
        }
        return;
    }
    let s = |v: usize| v as isize;
    // SAFETY: every view was checked on construction to lie inside its slice
    // (`MatRef::new` / `MatMut::new`: the element (rows − 1, cols − 1) at the largest
    // offset is in bounds, and strides are non-negative); the shapes chain (asserted
    // above, m, n, k ≥ 1); `dst` is borrowed mutably, so it aliases neither operand, and
    // its elements occupy distinct slots (checked in `MatMut::new`), so the parallel
    // writes of `gemm` never race. With `read_dst` false the destination's old values are
    // never read, with it true they are initialised `f32`s.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            s(dst.cs),
            s(dst.rs),
            accumulate,
            lhs.data.as_ptr(),
            s(lhs.cs),
            s(lhs.rs),
            rhs.data.as_ptr(),
            s(rhs.cs),
            s(rhs.rs),
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn products_match_the_naive_one_for_every_layout() {
        for &(m, k, n) in &[(1, 1, 1), (3, 5, 7), (17, 33, 9), (64, 9, 130), (5, 0, 4)] {
            let a = data(m * k, 1);
            let b = data(k * n, 2);
            let want = naive(&a, &b, m, k, n);
            // Plain row-major.
            let mut c = vec![f32::NAN; m * n];
            matmul(
                MatMut::row_major(&mut c, m, n),
                MatRef::row_major(&a, m, k),
                MatRef::row_major(&b, k, n),
                false,
            );
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-4, "{m}x{k}x{n}: {x} vs {y}");
            }
            // Transposed operands and a strided destination inside a wider buffer,
            // accumulating onto what is there.
            let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let wide = n + 3;
            let mut c2 = vec![1.0f32; m * wide];
            matmul(
                MatMut::new(&mut c2, m, n, wide, 1),
                MatRef::row_major(&at, k, m).t(),
                MatRef::row_major(&bt, n, k).t(),
                true,
            );
            for i in 0..m {
                for j in 0..wide {
                    let got = c2[i * wide + j];
                    let exp = if j < n { 1.0 + want[i * n + j] } else { 1.0 };
                    assert!(
                        (got - exp).abs() < 1e-4,
                        "{m}x{k}x{n} ({i},{j}): {got} vs {exp}"
                    );
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn a_view_past_the_slice_is_refused() {
        let v = vec![0f32; 10];
        let _ = MatRef::new(&v, 3, 4, 4, 1);
    }

    #[test]
    #[should_panic(expected = "overlap")]
    fn overlapping_destination_elements_are_refused() {
        let mut v = vec![0f32; 10];
        let _ = MatMut::new(&mut v, 3, 3, 1, 1);
    }
}
