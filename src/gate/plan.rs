//! Planning: every module mapped to its base tensor and its shape checked, before any maths.

use super::base_set::BaseSet;
use super::Gate;
use crate::adapter::{Adapter, LoraModule};
use crate::base::mapping;
use crate::error::Result;
use crate::tensor::TensorRef;

/// One module ready for the maths: validated and mapped.
pub(super) struct Job<'a> {
    pub(super) base: &'a BaseSet,
    pub(super) lora: &'a LoraModule,
    pub(super) base_tensor: String,
    pub(super) w0: TensorRef<'a>,
    /// The stored base tensor is `[in, out]` (`fan_in_fan_out`).
    pub(super) transposed: bool,
}

impl Gate {
    /// Maps every module to its base tensor and checks shapes, before any maths.
    pub(super) fn plan<'a>(&self, base: &'a BaseSet, adapter: &'a Adapter) -> Result<Vec<Job<'a>>> {
        let names: Vec<&str> = adapter.modules.iter().map(|m| m.name.as_str()).collect();
        let targets = mapping::map_modules(&names, &base.names())?;
        let mut jobs = Vec::with_capacity(targets.len());
        for (lora, base_tensor) in adapter.modules.iter().zip(targets) {
            let w0 = base.matrix(&base_tensor)?;
            let transposed = adapter.fan_in_fan_out;
            let (out, inn) = if transposed {
                (w0.cols, w0.rows)
            } else {
                (w0.rows, w0.cols)
            };
            if (out, inn) != (lora.out_features, lora.in_features) {
                crate::bail!(
                    Shape,
                    "module `{}`: B·A is [{}, {}] but base tensor `{base_tensor}` is [{out}, {inn}]{}",
                    lora.name,
                    lora.out_features,
                    lora.in_features,
                    if transposed { " (after fan_in_fan_out transpose)" } else { "" }
                );
            }
            jobs.push(Job {
                base,
                lora,
                base_tensor,
                w0,
                transposed,
            });
        }
        jobs.sort_by(|a, b| a.base_tensor.cmp(&b.base_tensor));
        Ok(jobs)
    }
}
