//! SplitMix64: the deterministic generator behind seeded start blocks (and the synthetic test
//! data), so runs, platforms and backends agree bit for bit.

use faer::Mat;

/// The SplitMix64 sequence (Steele, Lea, Flood 2014) from a seed.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(state: u64) -> Self {
        SplitMix64(state)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// A deterministic pseudo-random start block (splitmix64), so both runs and backends agree.
pub(crate) fn seeded_block(n: usize, b: usize, seed: u64) -> Mat<f64> {
    let mut rng = SplitMix64::new(seed ^ 0x9E37_79B9_7F4A_7C15);
    Mat::from_fn(n, b, |_, _| {
        (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    })
}

/// A rows × cols block of independent standard normal samples (Box–Muller on SplitMix64), filled
/// column by column: the same seed gives the same block on every platform and thread count.
pub fn gaussian_block(rows: usize, cols: usize, seed: u64) -> Mat<f64> {
    let mut rng = SplitMix64::new(seed ^ 0x5DEE_CE66_D1CE_4E5B);
    let mut uniform = move || ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let mut out = Mat::zeros(rows, cols);
    for j in 0..cols {
        for i in 0..rows {
            let (u1, u2) = (uniform(), uniform());
            out[(i, j)] = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        }
    }
    out
}
