//! An immutable f32 buffer that is either owned or a range of a read-only file mapping, so a
//! cached base spectrum stored in f32 is used where the page cache holds it: no copy, no
//! anonymous pages, and a warm one-shot scan touches each cached value fewer times.

use memmap2::Mmap;
use std::ops::{Deref, Range};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Floats(Store);

#[derive(Debug, Clone)]
enum Store {
    Owned(Arc<[f32]>),
    /// `range` (in bytes) of `map` is 4-byte aligned and a multiple of 4 long (checked in
    /// [`Floats::mapped`]).
    Mapped {
        map: Arc<Mmap>,
        range: Range<usize>,
    },
}

impl Floats {
    /// The little-endian f32 values in `range` of `map`, in place; None when the range is out of
    /// bounds, misaligned or not a whole number of values, or the host is big-endian (then the
    /// caller copies).
    pub fn mapped(map: &Arc<Mmap>, range: Range<usize>) -> Option<Floats> {
        let bytes = map.get(range.clone())?;
        let aligned = bytes.as_ptr().align_offset(4) == 0 && bytes.len() % 4 == 0;
        (cfg!(target_endian = "little") && aligned).then(|| {
            Floats(Store::Mapped {
                map: map.clone(),
                range,
            })
        })
    }

    pub fn is_mapped(&self) -> bool {
        matches!(self.0, Store::Mapped { .. })
    }
}

impl From<Vec<f32>> for Floats {
    fn from(v: Vec<f32>) -> Floats {
        Floats(Store::Owned(v.into()))
    }
}

impl FromIterator<f32> for Floats {
    fn from_iter<I: IntoIterator<Item = f32>>(iter: I) -> Floats {
        Floats(Store::Owned(iter.into_iter().collect()))
    }
}

impl Deref for Floats {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match &self.0 {
            Store::Owned(v) => v,
            // Alignment and length were checked when the range was taken; every bit pattern is
            // an f32.
            Store::Mapped { map, range } => bytemuck::cast_slice(&map[range.clone()]),
        }
    }
}

impl PartialEq for Floats {
    fn eq(&self, other: &Floats) -> bool {
        **self == **other
    }
}
