//! Base spectra and the top singular triplets of adapted weights.

pub mod brand;
pub mod cache;
pub mod dense;
pub mod device;
pub mod krylov;
pub mod randomized;
mod shift_invert;
mod small_eigen;
pub mod tuned;
