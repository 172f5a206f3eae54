//! Dropout with a counter-based random stream: the mask is a hash of (seed,
//! element index) computed in the kernel, so the backward pass recomputes it
//! instead of storing it, and a seed reproduces a run exactly.

use super::arith::map;
use super::record;
use crate::tensor::Tensor;
use kiln_device::{DeviceError, Elementwise, Result};

/// Keeps an element when its uniform draw is at least `p`, scaling by 1/(1-p).
const DROPOUT: &str = "select(0.0, x0 * s1, kiln_uniform(idx, u32(s2)) >= s0)";

impl Tensor {
    /// Zeroes each element with probability `p` and scales the rest by
    /// `1 / (1 - p)` (inverted dropout). `seed` selects the random stream (only
    /// its low 24 bits are used); with `training == false` this is the identity.
    pub fn dropout(&self, p: f32, seed: u32, training: bool) -> Result<Tensor> {
        if !(0.0..1.0).contains(&p) {
            return Err(DeviceError::Shape {
                op: "dropout",
                message: format!("probability {p} is outside [0, 1)"),
            });
        }
        if !training || p == 0.0 {
            return Ok(self.clone());
        }
        // The seed travels as an f32 holding an integer, exact below 2^24.
        let scalars = [p, 1.0 / (1.0 - p), (seed & 0xFF_FFFF) as f32];
        let op = Elementwise::new("dropout", DROPOUT).scalars(&scalars);
        let out = map(&op, &[self])?;
        Ok(record(&[self], out, "dropout", move |g| {
            let op = Elementwise::new("dropout_grad", DROPOUT).scalars(&scalars);
            Ok(vec![Some(map(&op, &[g])?)])
        }))
    }
}
