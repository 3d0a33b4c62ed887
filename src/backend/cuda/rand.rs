//! The seeded sketches: a cuRAND Philox4x32-10 generator on the backend's stream. Philox is
//! counter-based, so a seed (and offset 0, set on every reseed) fixes the numbers whatever the
//! launch configuration: the same seed gives the same sketch on every run of the same device
//! code. (They differ from the CPU solver's splitmix sketch; results agree to the residual
//! tolerance, not bit for bit.)

use super::device::Device;
use super::error::fits;
use super::error::{rand, CudaError};
use cudarc::curand::result as rand_result;
use cudarc::curand::sys as rand_sys;
use cudarc::driver::DevicePtrMut;

/// cuRAND's pseudo-random normal generators emit pairs (Box–Muller): the count must be even.
pub fn normal_count(len: usize) -> usize {
    len + len % 2
}

/// A Philox generator bound to one device's stream; destroyed on drop.
pub struct Philox<'d> {
    gen: rand_sys::curandGenerator_t,
    dev: &'d Device,
}

impl<'d> Philox<'d> {
    pub fn new(dev: &'d Device, seed: u64) -> Result<Philox<'d>, CudaError> {
        let gen = rand_result::create_generator_kind(
            rand_sys::curandRngType_t::CURAND_RNG_PSEUDO_PHILOX4_32_10,
        )
        .map_err(rand("create generator"))?;
        let philox = Philox { gen, dev };
        // SAFETY: `gen` was just created and is destroyed only by our Drop; the stream outlives
        // `dev`'s borrow.
        unsafe { rand_result::set_stream(gen, dev.stream.cu_stream() as _) }
            .map_err(rand("set stream"))?;
        // SAFETY: as above; seed and offset are plain integers.
        unsafe { rand_result::set_seed(gen, seed) }.map_err(rand("set seed"))?;
        // SAFETY: as above.
        unsafe { rand_result::set_offset(gen, 0) }.map_err(rand("set offset"))?;
        Ok(philox)
    }

    /// Fills the whole buffer (of even length, see [`normal_count`]) with N(0, 1) samples.
    pub fn fill_normal(&self, dst: &mut impl DevicePtrMut<f64>) -> Result<(), CudaError> {
        let len = dst.len();
        fits("curandGenerateNormalDouble", "out", normal_count(len), len)?;
        let (p, _rp) = dst.device_ptr_mut(&self.dev.stream);
        // SAFETY: `len` (even, checked) doubles lie in `dst`; the generator is live.
        unsafe { rand_result::generate::normal_f64(self.gen, p as *mut f64, len, 0.0, 1.0) }
            .map_err(rand("normal"))
    }
}

impl Drop for Philox<'_> {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed exactly once here. A failure leaves nothing to do.
        let _ = unsafe { rand_result::destroy_generator(self.gen) };
    }
}
