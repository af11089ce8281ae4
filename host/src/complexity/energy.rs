//! Signal energy: the mean squared value of the mean-removed gray signal in [0, 1]
//! (the image's variance), so a uniform image of any brightness has energy 0.

use super::filters::Plane;

/// `mean((g − mean(g))²)` of a gray plane in [0, 1].
pub fn signal_energy(p: &Plane) -> f64 {
    if p.data.is_empty() {
        return 0.0;
    }
    let m = p.mean();
    p.data
        .iter()
        .map(|&v| (f64::from(v) - m).powi(2))
        .sum::<f64>()
        / p.data.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_is_zero_and_a_two_level_image_is_a_quarter_of_its_contrast_squared() {
        assert_eq!(signal_energy(&Plane::filled(10, 10, 0.8)), 0.0);
        let p = Plane {
            width: 4,
            height: 1,
            data: vec![0.2, 0.8, 0.2, 0.8],
        };
        assert!((signal_energy(&p) - 0.09).abs() < 1e-7);
    }
}
