//! Adam with its moment estimates held as plain tensors, so the whole optimizer state
//! can be written into and read back from a checkpoint.

use std::collections::{BTreeMap, HashMap};

use anyhow::{anyhow, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

/// Adam (Kingma & Ba) without weight decay.
pub struct Adam {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Updates done so far (for bias correction).
    pub t: u64,
    m: BTreeMap<String, Tensor>,
    v: BTreeMap<String, Tensor>,
}

impl Adam {
    /// A fresh optimizer for the named variables (zero moments).
    pub fn new<'a>(vars: impl IntoIterator<Item = (&'a String, &'a Var)>) -> Result<Adam> {
        let mut m = BTreeMap::new();
        let mut v = BTreeMap::new();
        for (name, var) in vars {
            m.insert(name.clone(), var.as_tensor().zeros_like()?);
            v.insert(name.clone(), var.as_tensor().zeros_like()?);
        }
        Ok(Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            t: 0,
            m,
            v,
        })
    }

    /// One update with learning rate `lr`; variables without a gradient are skipped.
    pub fn step<'a>(
        &mut self,
        vars: impl IntoIterator<Item = (&'a String, &'a Var)>,
        grads: &GradStore,
        lr: f64,
    ) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        for (name, var) in vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Detached, so the moments never hold on to a backward graph.
            let g = g.detach();
            let m = self
                .m
                .get_mut(name)
                .ok_or_else(|| anyhow!("optimizer has no state for {name}"))?;
            *m = (m.affine(self.beta1, 0.0)? + g.affine(1.0 - self.beta1, 0.0)?)?.detach();
            let v = self
                .v
                .get_mut(name)
                .ok_or_else(|| anyhow!("optimizer has no state for {name}"))?;
            *v = (v.affine(self.beta2, 0.0)? + g.sqr()?.affine(1.0 - self.beta2, 0.0)?)?.detach();
            let m_hat = self.m[name].affine(1.0 / bc1, 0.0)?;
            let denom = self.v[name]
                .affine(1.0 / bc2, 0.0)?
                .sqrt()?
                .affine(1.0, self.eps)?;
            let update = m_hat.div(&denom)?.affine(lr, 0.0)?;
            var.set(&(var.as_tensor().detach() - update)?)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`adam.m.<name>`, `adam.v.<name>`).
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (k, t) in &self.m {
            out.insert(format!("adam.m.{k}"), t.clone());
        }
        for (k, t) in &self.v {
            out.insert(format!("adam.v.{k}"), t.clone());
        }
        out
    }

    /// Restores the moments written by [`Adam::tensors`]; `what` names the source.
    pub fn load(&mut self, tensors: &HashMap<String, Tensor>, t: u64, what: &str) -> Result<()> {
        for (prefix, map) in [("adam.m.", &mut self.m), ("adam.v.", &mut self.v)] {
            for (k, slot) in map.iter_mut() {
                let key = format!("{prefix}{k}");
                let src = tensors
                    .get(&key)
                    .ok_or_else(|| anyhow!("{what}: optimizer tensor `{key}` is missing"))?;
                if src.dims() != slot.dims() {
                    return Err(anyhow!(
                        "{what}: optimizer tensor `{key}` has the wrong shape"
                    ));
                }
                *slot = src.to_device(slot.device())?;
            }
        }
        self.t = t;
        Ok(())
    }
}
