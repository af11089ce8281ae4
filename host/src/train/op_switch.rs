//! A process-wide choice between one of the executor's own CPU ops and candle's
//! equivalent (batch norm, max-pool): set by the program (tests and benchmarks compare
//! the two), else by an environment variable, else the own op exactly when the
//! convolutions are the fast ones ([`conv::Mode::Fast`]), so `CCNET_CONV=candle` and
//! `im2col` keep measuring what they did before.

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::Tensor;

use super::conv;

/// One op's switch.
#[derive(Debug)]
pub struct OpSwitch {
    /// 0: not set (environment / convolution mode), 1: own op, 2: candle's.
    set: AtomicU8,
    /// Environment variable naming the choice (`candle` or `own`).
    var: &'static str,
    /// The variable's value that selects the own op.
    own: &'static str,
}

impl OpSwitch {
    /// A switch read from environment variable `var`, whose value `own` selects the own
    /// op and `candle` candle's.
    pub const fn new(var: &'static str, own: &'static str) -> OpSwitch {
        OpSwitch {
            set: AtomicU8::new(0),
            var,
            own,
        }
    }

    /// Whether the own op is chosen.
    pub fn own(&self) -> bool {
        match self.set.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => match std::env::var(self.var).as_deref() {
                Ok(v) if v == self.own => true,
                Ok("candle") => false,
                _ => conv::mode() == conv::Mode::Fast,
            },
        }
    }

    /// Chooses for the whole process; `None` goes back to the environment /
    /// convolution-mode default.
    pub fn set(&self, own: Option<bool>) {
        let v = match own {
            None => 0,
            Some(true) => 1,
            Some(false) => 2,
        };
        self.set.store(v, Ordering::Relaxed);
    }

    /// Whether the own op applies to `x`: chosen, and `x` an `f32` CPU tensor.
    pub fn applies(&self, x: &Tensor) -> bool {
        self.own() && conv::supports(x)
    }
}
