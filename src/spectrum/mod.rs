//! Base spectra and the top singular triplets of adapted weights.

//!
//! Stages, one per file: [`cache`] (base spectra), [`brand`] (the low-rank update), [`krylov`]
//! (the iterative top-k solve), [`dense`] (the f64 reference). Kernels they share, each in a file
//! named for it: [`kernels`] (products, norms, gaps), `cholesky`, `lu`, `tridiagonal` (the
//! symmetric tridiagonal eigensolver), `small_eigen` (Householder reduction + top eigenpairs),
//! `shift_invert` (Woodbury), `orthonormalize`, [`rng`]; tuning in [`params`].

use serde::Serialize;

/// Which solver produced a module's top triplets: the report's `solver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Solver {
    /// The Brand core solved iteratively (Davidson / Jacobi–Davidson) to the residual test.
    #[serde(rename = "davidson")]
    Davidson,
    /// The Brand core solved densely, chosen up front (r large relative to min(out, in)).
    #[serde(rename = "dense-core")]
    DenseCore,
    /// The iterative solve missed its budget; the core was solved densely instead.
    #[serde(rename = "dense-core-fallback")]
    DenseCoreFallback,
    /// Thin SVDs of `W'` and `W0` in f64: the reference method.
    #[serde(rename = "dense")]
    Dense,
    /// `--tuned`: `ΔW = W' − W0` has low rank (a merged LoRA), factored and solved by the Brand
    /// update against the cached base spectrum.
    #[serde(rename = "merged-lora")]
    MergedLora,
    /// Seeded sketch + block Krylov, residual-checked (`--tuned` full fine-tunes, DoRA).
    #[serde(rename = "randomized")]
    Randomized,
    /// The randomized solver's operator was too small for a sketch: a dense f64 SVD up front.
    #[serde(rename = "randomized-dense-small")]
    RandomizedDenseSmall,
    /// The randomized solver's Krylov basis hit its cap first: a dense f64 SVD.
    #[serde(rename = "randomized-dense-fallback")]
    RandomizedDenseFallback,
}

impl Solver {
    /// Whether the randomized solver (and so its seed) produced the triplets.
    pub fn is_randomized(self) -> bool {
        matches!(
            self,
            Solver::Randomized | Solver::RandomizedDenseSmall | Solver::RandomizedDenseFallback
        )
    }

    pub fn label(self) -> &'static str {
        match self {
            Solver::Davidson => "davidson",
            Solver::DenseCore => "dense-core",
            Solver::DenseCoreFallback => "dense-core-fallback",
            Solver::Dense => "dense",
            Solver::MergedLora => "merged-lora",
            Solver::Randomized => "randomized",
            Solver::RandomizedDenseSmall => "randomized-dense-small",
            Solver::RandomizedDenseFallback => "randomized-dense-fallback",
        }
    }
}

pub mod brand;
pub mod cache;
mod cholesky;
pub mod dense;
pub mod device;
pub mod fingerprints;
pub(crate) mod kernels;
pub mod krylov;
mod lu;
mod operators;
mod orthonormalize;
pub mod params;
pub mod probe;
pub mod randomized;
pub mod rng;
mod shift_invert;
mod small_eigen;
mod tridiagonal;
pub mod tuned;
