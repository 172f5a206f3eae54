//! The LSTM as one op: the input projection of every step in one matmul, then
//! the recurrence: one dispatch for the whole sequence where the hidden size
//! is a multiple of 4, else per step one recurrent matmul and one fused gate
//! kernel. Backward through time likewise, then the weight gradients of all
//! steps in one matmul each.

use super::record;
use crate::tensor::Tensor;
use kiln_device::{DType, DeviceError, LstmBackward, LstmForward, LstmShape, Matmul, Result};

fn shape_error(message: String) -> DeviceError {
    DeviceError::Shape {
        op: "lstm",
        message,
    }
}

impl Tensor {
    /// Runs an LSTM over a batch-first sequence `self` (`[batch, steps,
    /// features]`) from a zero state and returns every step's hidden state,
    /// `[batch, steps, hidden]` (take the last step for Keras's default
    /// `return_sequences=False`).
    ///
    /// Weights as Keras stores them: `w_ih` `[features, 4 * hidden]`, `w_hh`
    /// `[hidden, 4 * hidden]`, `bias` `[4 * hidden]`, gates in the order input,
    /// forget, cell candidate, output. `mask` (`[batch, steps]`, 1 for real
    /// steps, 0 for padding) makes padded steps keep the previous state, so
    /// the state after the last step is the state after the last real token
    /// wherever the padding is.
    pub fn lstm(
        &self,
        w_ih: &Tensor,
        w_hh: &Tensor,
        bias: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let &[b, t, e] = self.shape() else {
            return Err(shape_error(format!(
                "input must be [batch, steps, features], got {:?}",
                self.shape()
            )));
        };
        if t == 0 {
            return Err(shape_error(format!(
                "input {:?} has no time steps: sequences need at least one",
                self.shape()
            )));
        }
        let &[hh, h4] = w_hh.shape() else {
            return Err(shape_error(format!(
                "w_hh must be [hidden, 4 * hidden], got {:?}",
                w_hh.shape()
            )));
        };
        let h = hh;
        if h4 != 4 * h || w_ih.shape() != [e, 4 * h] || bias.shape() != [4 * h] {
            return Err(shape_error(format!(
                "for {e} features and {h} units expected w_ih [{e}, {}], w_hh [{h}, {}], \
                 bias [{}]; got {:?}, {:?}, {:?}",
                4 * h,
                4 * h,
                4 * h,
                w_ih.shape(),
                w_hh.shape(),
                bias.shape()
            )));
        }
        if let Some(m) = mask {
            if m.shape() != [b, t] {
                return Err(shape_error(format!(
                    "mask must be [{b}, {t}] for input {:?}, got {:?}",
                    self.shape(),
                    m.shape()
                )));
            }
        }
        let device = self.device();
        let shape = LstmShape {
            steps: t,
            batch: b,
            hidden: h,
        };
        // Time-major inside: slot t of every sequence buffer is one contiguous
        // [batch, ...] block, which the per-step matmuls address as batch entry t.
        let x_tbe = device.strided_copy(self.buffer(), &[t, b, e], &[e, t * e, 1], 0)?;
        let xproj = device.matmul(&x_tbe, w_ih.buffer(), &Matmul::new(t * b, 4 * h, e))?;
        let mask_tb = match mask {
            Some(m) => {
                let tb = device.strided_copy(m.buffer(), &[t, b], &[1, t], 0)?;
                Tensor::from_buffer(device, tb, &[t, b])?
            }
            None => Tensor::ones(device, &[t, b])?,
        };
        let gates = device.empty(t * b * 4 * h, DType::F32)?;
        let cells = device.zeros((t + 1) * b * h, DType::F32)?;
        let states = device.zeros((t + 1) * b * h, DType::F32)?;
        let buffers = LstmForward {
            xproj: &xproj,
            bias: bias.buffer(),
            mask: mask_tb.buffer(),
            gates: &gates,
            cells: &cells,
            states: &states,
        };
        let sequence = device.lstm_prefers_sequence(&shape);
        if sequence {
            device.lstm_forward_sequence(&shape, w_hh.buffer(), &buffers)?;
        } else {
            let rec = device.empty(t * b * 4 * h, DType::F32)?;
            let recurrent = Matmul {
                batch: t,
                batch_stride_a: b * h,
                batch_stride_b: 0,
                ..Matmul::new(b, 4 * h, h)
            };
            for step in 0..t {
                device.matmul_entries_into(
                    &states,
                    w_hh.buffer(),
                    &rec,
                    &recurrent,
                    step..step + 1,
                )?;
                device.lstm_forward_step(&shape, step, &rec, &buffers)?;
            }
        }
        // [T + 1, B, H] from slot 1 -> [B, T, H]
        let out = device.strided_copy(&states, &[b, t, h], &[h, b * h, 1], b * h)?;
        let out = Tensor::from_buffer(device, out, &[b, t, h])?;

        let need = [
            self.is_requires_grad(),
            w_ih.is_requires_grad(),
            w_hh.is_requires_grad(),
            bias.is_requires_grad(),
        ];
        let (w_ih_v, w_hh_v) = (w_ih.detach(), w_hh.detach());
        Ok(record(&[self, w_ih, w_hh, bias], out, "lstm", move |g| {
            let device = g.device();
            let d_out = device.strided_copy(g.buffer(), &[t, b, h], &[h, t * h, 1], 0)?;
            let rows = t * b;
            let d_gates = Tensor::from_buffer(
                device,
                device.empty(rows * 4 * h, DType::F32)?,
                &[rows, 4 * h],
            )?;
            let dc = device.zeros(b * h, DType::F32)?;
            let dh_carry = device.zeros(b * h, DType::F32)?;
            let back = LstmBackward {
                d_out: &d_out,
                mask: mask_tb.buffer(),
                gates: &gates,
                cells: &cells,
                d_gates: d_gates.buffer(),
                dc: &dc,
                dh_carry: &dh_carry,
            };
            if sequence {
                device.lstm_backward_sequence(&shape, w_hh_v.buffer(), &back)?;
            } else {
                // d h_{t-1} = d_gates_t W_hh^T, into slot t of dh_rec.
                let dh_rec = device.zeros((t + 1) * b * h, DType::F32)?;
                let recurrent_back = Matmul {
                    batch: t,
                    batch_stride_a: b * 4 * h,
                    batch_stride_b: 0,
                    ..Matmul::new(b, h, 4 * h).transpose_b(true)
                };
                for step in (0..t).rev() {
                    device.lstm_backward_step(&shape, step, &dh_rec, &back)?;
                    if step > 0 {
                        device.matmul_entries_into(
                            d_gates.buffer(),
                            w_hh_v.buffer(),
                            &dh_rec,
                            &recurrent_back,
                            step..step + 1,
                        )?;
                    }
                }
            }
            let dx = if need[0] {
                let dx = device.matmul(
                    d_gates.buffer(),
                    w_ih_v.buffer(),
                    &Matmul::new(rows, e, 4 * h).transpose_b(true),
                )?;
                let dx = device.strided_copy(&dx, &[b, t, e], &[e, b * e, 1], 0)?;
                Some(Tensor::from_buffer(device, dx, &[b, t, e])?)
            } else {
                None
            };
            let weight_grad = |input: &kiln_device::GpuBuffer, width: usize| -> Result<Tensor> {
                let dw = device.matmul(
                    input,
                    d_gates.buffer(),
                    &Matmul::new(width, 4 * h, rows).transpose_a(true),
                )?;
                Tensor::from_buffer(device, dw, &[width, 4 * h])
            };
            let dw_ih = need[1].then(|| weight_grad(&x_tbe, e)).transpose()?;
            // Slots 0..T of the states are each step's h_{t-1}.
            let dw_hh = need[2].then(|| weight_grad(&states, h)).transpose()?;
            let dbias = need[3].then(|| d_gates.sum(0, false)).transpose()?;
            Ok(vec![dx, dw_ih, dw_hh, dbias])
        }))
    }
}
