//! Base spectra and the top singular triplets of adapted weights.

pub mod brand;
pub mod krylov;
