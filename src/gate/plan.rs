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
        let shapes: Vec<_> = adapter
            .modules
            .iter()
            .map(|m| (m.name.as_str(), m.out_features, m.in_features))
            .collect();
        let targets = Self::map_checked(base, &shapes, adapter.fan_in_fan_out)?;
        let mut jobs = Vec::with_capacity(targets.len());
        for (lora, base_tensor) in adapter.modules.iter().zip(targets) {
            jobs.push(Job {
                base,
                lora,
                w0: base.matrix(&base_tensor)?,
                base_tensor,
                transposed: adapter.fan_in_fan_out,
            });
        }
        jobs.sort_by(|a, b| a.base_tensor.cmp(&b.base_tensor));
        Ok(jobs)
    }

    /// The base tensor of each `(module, out_features, in_features)`, after checking that its
    /// shape is `[out, in]` (`[in, out]` when `transposed`, for `fan_in_fan_out`).
    pub(super) fn map_checked(
        base: &BaseSet,
        modules: &[(&str, usize, usize)],
        transposed: bool,
    ) -> Result<Vec<String>> {
        if base.model.is_none() && base.host.is_empty() {
            crate::bail!(
                InvalidArgument,
                "no base attached: attach a base model (or base tensors) before screening"
            );
        }
        let names: Vec<&str> = modules.iter().map(|m| m.0).collect();
        let targets = mapping::map_modules(&names, &base.names())?;
        for (&(module, out_features, in_features), base_tensor) in modules.iter().zip(&targets) {
            let w0 = base.matrix(base_tensor)?;
            let (out, inn) = if transposed {
                (w0.cols, w0.rows)
            } else {
                (w0.rows, w0.cols)
            };
            if (out, inn) != (out_features, in_features) {
                crate::bail!(
                    Shape,
                    "module `{module}`: B·A is [{out_features}, {in_features}] but base tensor `{base_tensor}` is [{out}, {inn}]{}",
                    if transposed { " (after fan_in_fan_out transpose)" } else { "" }
                );
            }
        }
        Ok(targets)
    }
}
