//! Base spectra and the top singular triplets of adapted weights.

pub mod brand;
pub mod cache;
pub mod dense;
pub mod krylov;
mod shift_invert;
mod small_eigen;
