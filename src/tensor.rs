//! Element types and borrowed 2-D tensors, and their conversion to the f32/f64 the maths uses.

use crate::bail;
use crate::error::Result;
use half::{bf16, f16};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F64 => 8,
        }
    }
    /// The safetensors spelling ("F32", "F16", "BF16", "F64").
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F64 => "F64",
        }
    }
    /// `None` for dtypes we do not do maths on (integers, bool, fp8, …).
    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        match name {
            "F32" => Some(DType::F32),
            "F16" => Some(DType::F16),
            "BF16" => Some(DType::BF16),
            "F64" => Some(DType::F64),
            _ => None,
        }
    }
}

/// A row-major 2-D tensor borrowed from a memory map or from the host's memory.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub bytes: &'a [u8],
}

impl<'a> TensorRef<'a> {
    /// Checks that `bytes` holds exactly `rows × cols` elements of `dtype`.
    pub fn new(dtype: DType, rows: usize, cols: usize, bytes: &'a [u8]) -> Result<Self> {
        let want = rows
            .checked_mul(cols)
            .and_then(|n| n.checked_mul(dtype.size()));
        if want != Some(bytes.len()) {
            bail!(
                Shape,
                "tensor of shape [{rows}, {cols}] {dtype:?} needs {want:?} bytes, got {}",
                bytes.len()
            );
        }
        Ok(TensorRef {
            dtype,
            rows,
            cols,
            bytes,
        })
    }

    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` (row-major) as f64. Unaligned-safe: reads little-endian bytes.
    #[inline]
    fn get(&self, i: usize) -> f64 {
        let b = self.bytes;
        match self.dtype {
            DType::F32 => f32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap()) as f64,
            DType::F64 => f64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap()),
            DType::F16 => f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f64(),
            DType::BF16 => bf16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f64(),
        }
    }

    /// Row `i` (< rows) as a 1×cols tensor over the same bytes: lets a pass over a large tensor
    /// decode one row at a time instead of copying the whole of it.
    pub fn row(&self, i: usize) -> TensorRef<'a> {
        self.row_range(i, 1)
    }

    /// Rows `start..start + count` as a tensor over the same bytes.
    fn row_range(&self, start: usize, count: usize) -> TensorRef<'a> {
        let width = self.cols * self.dtype.size();
        TensorRef {
            rows: count,
            bytes: &self.bytes[start * width..(start + count) * width],
            ..*self
        }
    }

    /// The tensor in blocks of whole rows, ~16K values each, with each block's first row: a pass
    /// that decodes a block at a time through [`TensorRef::to_f32`] (several times faster than
    /// element by element) keeps its decoded copy small for a tensor of any size.
    fn row_blocks(&self) -> impl Iterator<Item = (usize, TensorRef<'a>)> + '_ {
        let block_rows = (16 * 1024 / self.cols.max(1)).max(1);
        (0..self.rows)
            .step_by(block_rows)
            .map(move |r0| (r0, self.row_range(r0, block_rows.min(self.rows - r0))))
    }

    /// All elements as f64, row-major.
    pub fn to_f64(&self) -> Vec<f64> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }

    /// All elements as f32, row-major (f64 inputs are rounded). Hot on the warm path (cache
    /// files, adapters), so each dtype gets a loop the compiler can vectorise.
    pub fn to_f32(&self) -> Vec<f32> {
        let b = self.bytes;
        match self.dtype {
            // A plain copy on little-endian machines (the data need not be 4-byte aligned), into
            // memory that is not zeroed first: cached spectra are megabytes per screening.
            DType::F32 if cfg!(target_endian = "little") => {
                let n = b.len() / 4;
                let mut out = Vec::<f32>::with_capacity(n);
                // SAFETY: `out` has room for n f32 (4n bytes), `b` holds at least 4n bytes, the
                // two do not overlap, and every bit pattern is a valid f32.
                unsafe {
                    std::ptr::copy_nonoverlapping(b.as_ptr(), out.as_mut_ptr().cast::<u8>(), n * 4);
                    out.set_len(n);
                }
                out
            }
            DType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::BF16 => b
                .chunks_exact(2)
                .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
                .collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::F64 => (0..self.len()).map(|i| self.get(i) as f32).collect(),
        }
    }

    /// The Frobenius norm (accumulated in f64, which no f32/f16/bf16 input overflows), or a
    /// `NonFinite` error naming the first NaN or Inf. `what` names the tensor.
    pub fn checked_norm(&self, what: &str) -> Result<f64> {
        let mut sum = 0.0f64;
        let mut finite = true;
        // f32, f16 and bf16 a block of rows at a time through the vectorised decoding, f64
        // element by element (rounding it to f32 could overflow); summed in f64 in row-major
        // order either way.
        for (r0, block) in self.row_blocks() {
            if self.dtype == DType::F64 {
                for j in 0..block.len() {
                    let x = block.get(j);
                    finite &= x.is_finite();
                    sum += x * x;
                }
            } else {
                for x in block.to_f32() {
                    finite &= x.is_finite();
                    sum += f64::from(x) * f64::from(x);
                }
            }
            if !finite {
                let (i, j) = block
                    .first_non_finite()
                    .expect("a non-finite value in this block");
                let x = block.get(i * self.cols + j);
                bail!(NonFinite, "{what} has {x} at (row {}, col {j})", r0 + i);
            }
        }
        Ok(sum.sqrt())
    }

    /// The first non-finite element, as (row, col), if any.
    pub fn first_non_finite(&self) -> Option<(usize, usize)> {
        let at = |i: usize| (i / self.cols, i % self.cols);
        if self.dtype == DType::F64 {
            return (0..self.len()).find(|&i| !self.get(i).is_finite()).map(at);
        }
        // f32, f16 and bf16 decode to f32 exactly, NaN and Inf included; the vectorised decoding
        // is several times faster than `get` per element (it was a third of an adapter's load).
        self.row_blocks().find_map(|(r0, block)| {
            let i = block.to_f32().iter().position(|x| !x.is_finite())?;
            Some(at(r0 * self.cols + i))
        })
    }
}

/// Encodes f32 values as little-endian bytes of `dtype` (for writing adapters and caches).
pub fn encode(values: &[f32], dtype: DType) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    for &v in values {
        match dtype {
            DType::F32 => out.extend_from_slice(&v.to_le_bytes()),
            DType::F64 => out.extend_from_slice(&(v as f64).to_le_bytes()),
            DType::F16 => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
            DType::BF16 => out.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `first_non_finite` of `v` stored as `dtype`, `rows × cols`.
    fn first_bad<T: Copy>(
        v: &[T],
        dtype: DType,
        rows: usize,
        cols: usize,
        bytes: impl Fn(&[T]) -> Vec<u8>,
    ) -> Option<(usize, usize)> {
        let b = bytes(v);
        TensorRef::new(dtype, rows, cols, &b)
            .unwrap()
            .first_non_finite()
    }

    #[test]
    fn first_non_finite_names_the_first_nan_or_inf_in_every_dtype() {
        let (rows, cols) = (5, 7);
        for dtype in [DType::F32, DType::F16, DType::BF16, DType::F64] {
            let enc = |v: &[f32]| encode(v, dtype);
            for (at, bad) in [(0, f32::NAN), (18, f32::INFINITY), (34, f32::NEG_INFINITY)] {
                let mut v: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.25 - 3.0).collect();
                v[at] = bad;
                // A later non-finite value must not be the one reported.
                if at + 1 < v.len() {
                    v[at + 1] = f32::NAN;
                }
                let got = first_bad(&v, dtype, rows, cols, enc);
                assert_eq!(got, Some((at / cols, at % cols)), "{dtype:?}");
            }
            let finite = vec![65504.0; rows * cols];
            assert_eq!(
                first_bad(&finite, dtype, rows, cols, enc),
                None,
                "{dtype:?}"
            );
        }
        // Several decoding blocks (16K values each): a value in a later block, at its place.
        let (rows, cols) = (70, 1000);
        let mut v = vec![0.5f32; rows * cols];
        v[53 * cols + 17] = f32::NAN;
        for dtype in [DType::F32, DType::BF16] {
            let got = first_bad(&v, dtype, rows, cols, |v| encode(v, dtype));
            assert_eq!(got, Some((53, 17)), "{dtype:?}");
        }
        // A finite f64 beyond f32's range is finite in the file: no rounding to f32 first.
        let f64_bytes = |v: &[f64]| v.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(first_bad(&[1e300, -2.0], DType::F64, 1, 2, f64_bytes), None);
    }

    #[test]
    fn checked_norm_sums_every_block_and_names_a_nan_in_a_later_one() {
        // 70 rows of 1000: five decoding blocks of 16 rows, the last one short.
        let (rows, cols) = (70, 1000);
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 1009) as f32 / 1009.0 - 0.5)
            .collect();
        for dtype in [DType::F32, DType::F16, DType::BF16, DType::F64] {
            let b = encode(&v, dtype);
            let t = TensorRef::new(dtype, rows, cols, &b).unwrap();
            // The reference: every stored value, decoded one at a time, squared and summed in f64.
            let want = (0..t.len()).map(|i| t.get(i).powi(2)).sum::<f64>().sqrt();
            let got = t.checked_norm("w").unwrap();
            assert!(
                (got - want).abs() <= 1e-12 * want,
                "{dtype:?}: {got} vs {want}"
            );
            let mut bad = v.clone();
            bad[65 * cols + 999] = f32::INFINITY;
            bad[66 * cols] = f32::NAN;
            let b = encode(&bad, dtype);
            let e = TensorRef::new(dtype, rows, cols, &b)
                .unwrap()
                .checked_norm("w")
                .unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::NonFinite, "{dtype:?}");
            assert!(
                e.message().contains("w has inf at (row 65, col 999)"),
                "{dtype:?}: {}",
                e.message()
            );
        }
    }
}
