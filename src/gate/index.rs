//! `index`: every base tensor's spectrum computed (or verified) into the cache, in parallel.

use super::progress::{IndexProgress, IndexSummary};
use super::Gate;
use crate::error::Result;
use crate::spectrum::cache::Source;
use rayon::prelude::*;
use std::time::Instant;

impl Gate {
    /// Computes and caches the base spectrum of every 2-D float base tensor (matching `include`),
    /// in parallel. Entries already cached are verified, not recomputed, so an interrupted run
    /// resumes where it stopped. `progress` is called once per finished tensor.
    pub fn index(
        &self,
        include: Option<&regex::Regex>,
        progress: &(dyn Fn(&IndexProgress<'_>) + Sync),
    ) -> Result<IndexSummary> {
        let started = Instant::now();
        let base = self.base.read();
        let names: Vec<String> = base
            .names()
            .into_iter()
            .filter(|n| include.is_none_or(|re| re.is_match(n)))
            .collect();
        if let (Some(re), true) = (include, names.is_empty()) {
            crate::bail!(
                InvalidArgument,
                "the include pattern `{re}` matches none of the base's {} 2-D float tensors",
                base.names().len()
            );
        }
        let total = names.len();
        let done = std::sync::atomic::AtomicUsize::new(0);
        let sources: Result<Vec<Source>> = self.pool.install(|| {
            names
                .par_iter()
                .map(|name| {
                    let w0 = base.matrix(name)?;
                    let fetched = self.base_spectrum(&base, name, &w0)?;
                    let source = fetched.source;
                    // Indexing fills the disk cache: an entry not written fails it.
                    if let Some(w) = fetched.not_written {
                        crate::bail!(Io, "{w}");
                    }
                    progress(&IndexProgress {
                        done: done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
                        total,
                        name,
                        shape: [w0.rows, w0.cols],
                        source,
                        elapsed_s: started.elapsed().as_secs_f64(),
                    });
                    Ok(source)
                })
                .collect()
        });
        self.cache.save_fingerprints();
        let sources = sources?;
        let count = |s: Source| sources.iter().filter(|&&x| x == s).count();
        Ok(IndexSummary {
            tensors: total,
            computed: count(Source::Computed) + count(Source::RebuiltCorrupt),
            already_cached: count(Source::DiskHit) + count(Source::MemoryHit),
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}
