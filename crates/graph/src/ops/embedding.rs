//! Embedding lookup with a deterministic scatter-add backward (no atomics).

use super::record;
use crate::tensor::Tensor;
use kiln_device::{DeviceError, Result};

const FORWARD_SRC: &str = include_str!("../../../../shaders/embedding.wgsl");
const BACKWARD_SRC: &str = include_str!("../../../../shaders/embedding_backward.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    count: u32,
    dim: u32,
    row_threads: u32,
    _pad: u32,
}

/// Positions of each distinct id, grouped: (distinct ids, CSR starts, positions).
fn group_positions(ids: &[u32]) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut order: Vec<u32> = (0..ids.len() as u32).collect();
    order.sort_by_key(|&i| ids[i as usize]);
    let mut unique = Vec::new();
    let mut starts = Vec::new();
    for (k, &pos) in order.iter().enumerate() {
        let id = ids[pos as usize];
        if unique.last() != Some(&id) {
            unique.push(id);
            starts.push(k as u32);
        }
    }
    starts.push(order.len() as u32);
    (unique, starts, order)
}

impl Tensor {
    /// Looks up rows of this `[vocab, dim]` table: the result has shape
    /// `ids_shape + [dim]`. Its gradient adds up correctly for repeated ids.
    pub fn embedding(&self, ids: &[u32], ids_shape: &[usize]) -> Result<Tensor> {
        let &[vocab, dim] = self.shape() else {
            return Err(DeviceError::Shape {
                op: "embedding",
                message: format!("the table must be [vocab, dim], got {:?}", self.shape()),
            });
        };
        kiln_device::kernels::expect_f32("embedding", "the table", self.buffer())?;
        if crate::tensor::numel_of(ids_shape) != ids.len() {
            return Err(DeviceError::Shape {
                op: "embedding",
                message: format!("{} ids do not fill shape {ids_shape:?}", ids.len()),
            });
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(DeviceError::Shape {
                op: "embedding",
                message: format!("id {bad} out of range for a vocabulary of {vocab}"),
            });
        }
        let device = self.device();
        let ids_buffer = device.upload(ids)?;
        let out = device.empty(ids.len() * dim, kiln_device::DType::F32)?;
        let (grid, row_threads) = device.linear_grid(ids.len() * dim)?;
        let params = Params {
            count: ids.len() as u32,
            dim: dim as u32,
            row_threads,
            _pad: 0,
        };
        let kernel = device.kernel("embedding", || FORWARD_SRC.to_string())?;
        device.dispatch(
            &kernel,
            bytemuck::bytes_of(&params),
            &[self.buffer(), &ids_buffer, &out],
            grid,
        )?;
        let mut shape = ids_shape.to_vec();
        shape.push(dim);
        let out = Tensor::from_buffer(device, out, &shape)?;
        let ids = ids.to_vec();
        Ok(record(&[self], out, "embedding", move |g| {
            let device = g.device();
            let (unique, starts, positions) = group_positions(&ids);
            let grad = Tensor::zeros(device, &[vocab, dim])?;
            let (grid, row_threads) = device.linear_grid(unique.len() * dim)?;
            let params = Params {
                count: unique.len() as u32,
                dim: dim as u32,
                row_threads,
                _pad: 0,
            };
            let kernel = device.kernel("embedding_backward", || BACKWARD_SRC.to_string())?;
            let (u, s, p) = (
                device.upload(&unique)?,
                device.upload(&starts)?,
                device.upload(&positions)?,
            );
            device.dispatch(
                &kernel,
                bytemuck::bytes_of(&params),
                &[g.buffer(), &u, &s, &p, grad.buffer()],
                grid,
            )?;
            Ok(vec![Some(grad)])
        }))
    }
}
