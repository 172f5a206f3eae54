//! 2-D convolution over NCHW tensors, as im2col + matmul.
//!
//! NCHW because it is PyTorch's layout and what checkpoints from it use; the
//! im2col view makes the matmul see `[positions, c * kh * kw]` either way.
//! The backward pass reuses the forward's column matrix for the weight
//! gradient and folds the column gradient back with col2im (a gather: each
//! input pixel sums the column entries that read it).

use super::arith::{bias_then, output_derivative};
use super::{contiguous_strides, record};
use crate::tensor::Tensor;
use kiln_device::{
    ConvGeometry, DType, DeviceError, Elementwise, Epilogue, EpilogueOperand, Matmul, Result,
    UnaryOp, View,
};

/// Stride, zero padding and dilation of a convolution, per (height, width).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2d {
    /// Step between windows, `[height, width]`; default `[1, 1]`.
    pub stride: [usize; 2],
    /// Zeros added on each side, `[height, width]`; default `[0, 0]`.
    pub padding: [usize; 2],
    /// Spacing between kernel taps, `[height, width]`; default `[1, 1]`.
    pub dilation: [usize; 2],
}

impl Default for Conv2d {
    fn default() -> Self {
        Self {
            stride: [1, 1],
            padding: [0, 0],
            dilation: [1, 1],
        }
    }
}

impl Conv2d {
    /// Keras's `padding="same"` for stride 1 and odd kernels: `(k - 1) / 2`
    /// on each side, so the output keeps the input's size. An even kernel
    /// would need one more row and column at the bottom and right than at
    /// the top and left, which this symmetric padding cannot express: pad
    /// the input with [`Tensor::pad2d_with`] first and convolve unpadded.
    pub fn same(kernel: [usize; 2]) -> Self {
        Self {
            // (A zero kernel is conv2d's error to report.)
            padding: [
                kernel[0].saturating_sub(1) / 2,
                kernel[1].saturating_sub(1) / 2,
            ],
            ..Self::default()
        }
    }
}

/// Border handling of pooling windows, as Keras's `padding` argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Padding {
    /// Only windows that fit inside the input: `(size - kernel) / stride + 1`.
    #[default]
    Valid,
    /// `ceil(size / stride)` outputs; the border is padded as TensorFlow does
    /// (the odd extra row or column at the bottom/right), and padded cells never
    /// count: a max ignores them and an average divides by the cells inside.
    Same,
}

impl Padding {
    /// `[before, after]` padding of one spatial dim (a stride of 0 counts
    /// as 1 here; pooling refuses it).
    pub fn amounts(self, size: usize, kernel: usize, stride: usize) -> [usize; 2] {
        match self {
            Padding::Valid => [0, 0],
            Padding::Same => {
                let stride = stride.max(1);
                let out = size.div_ceil(stride);
                let total = ((out.max(1) - 1).saturating_mul(stride))
                    .saturating_add(kernel)
                    .saturating_sub(size);
                [total / 2, total - total / 2]
            }
        }
    }
}

fn shape_error(message: String) -> DeviceError {
    DeviceError::Shape {
        op: "conv2d",
        message,
    }
}

impl Tensor {
    /// Zero-pads the last two dims by `[top/bottom, left/right]`.
    pub fn pad2d(&self, pad: [usize; 2]) -> Result<Tensor> {
        self.pad2d_with([[pad[0]; 2], [pad[1]; 2]], 0.0)
    }

    /// Pads the last two dims with `value`: `pads` is
    /// `[[top, bottom], [left, right]]`. The gradient is the interior of the
    /// incoming one.
    pub fn pad2d_with(&self, pads: [[usize; 2]; 2], value: f32) -> Result<Tensor> {
        if pads == [[0, 0], [0, 0]] {
            return Ok(self.clone());
        }
        let r = self.rank();
        if r < 2 {
            return Err(shape_error(format!("cannot pad shape {:?}", self.shape())));
        }
        let (h, w) = (self.shape()[r - 2], self.shape()[r - 1]);
        let grown =
            |size: usize, [before, after]: [usize; 2]| size.checked_add(before)?.checked_add(after);
        let (Some(hp), Some(wp)) = (grown(h, pads[0]), grown(w, pads[1])) else {
            return Err(shape_error(format!(
                "padding {pads:?} overflows shape {:?}",
                self.shape()
            )));
        };
        let mut padded = self.shape().to_vec();
        padded[r - 2] = hp;
        padded[r - 1] = wp;
        // The interior of the padded tensor, as a view: outer dims step a whole
        // padded image, rows step wp.
        let strides = contiguous_strides(&padded);
        let offset = pads[0][0] * wp + pads[1][0];
        let out = Tensor::full(self.device(), &padded, value)?;
        self.device()
            .strided_write(out.buffer(), self.shape(), &strides, offset, self.buffer())?;
        let (shape, view) = (self.shape().to_vec(), strides);
        Ok(record(&[self], out, "pad2d", move |g| {
            let inner = g.device().strided_copy(g.buffer(), &shape, &view, offset)?;
            Ok(vec![Some(Tensor::from_buffer(g.device(), inner, &shape)?)])
        }))
    }

    /// 2-D cross-correlation (PyTorch's `conv2d`): `self` is `[n, c, h, w]`,
    /// `weight` `[out, c, kh, kw]`, `bias` `[out]`; the result is
    /// `[n, out, oh, ow]`.
    pub fn conv2d(&self, weight: &Tensor, bias: Option<&Tensor>, conv: Conv2d) -> Result<Tensor> {
        self.conv2d_impl(weight, bias, conv, None)
    }

    /// `op(conv2d(self, weight) + bias)`, a convolution layer with its
    /// activation. For ReLU, sigmoid and tanh (whose derivatives read their
    /// output) the product kernel applies the bias and the activation as it
    /// stores, so the pre-activation is never written; other activations
    /// take a kernel of their own.
    ///
    /// ```
    /// # fn main() -> kiln_device::Result<()> {
    /// use kiln_graph::{device::UnaryOp, Conv2d, Device, Tensor};
    /// let device = Device::new()?;
    /// let x = Tensor::from_slice(&device, &[1.0, -2.0, 3.0, -4.0], &[1, 1, 2, 2])?;
    /// let w = Tensor::from_slice(&device, &[1.0, -1.0], &[2, 1, 1, 1])?;
    /// let b = Tensor::from_slice(&device, &[0.5, 0.0], &[2])?;
    /// let y = x.conv2d_then(&w, &b, Conv2d::default(), UnaryOp::Relu)?;
    /// assert_eq!(y.to_vec()?, vec![1.5, 0.0, 3.5, 0.0, 0.0, 2.0, 0.0, 4.0]);
    /// # Ok(()) }
    /// ```
    pub fn conv2d_then(
        &self,
        weight: &Tensor,
        bias: &Tensor,
        conv: Conv2d,
        op: UnaryOp,
    ) -> Result<Tensor> {
        match output_derivative(op) {
            Some(_) if bias.buffer().dtype() == DType::F32 => {
                self.conv2d_impl(weight, Some(bias), conv, Some(op))
            }
            _ => self.conv2d_impl(weight, Some(bias), conv, None)?.unary(op),
        }
    }

    /// The convolution, with `activation` (one whose derivative reads its
    /// output, and an f32 bias) applied in the product's epilogue.
    fn conv2d_impl(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        conv: Conv2d,
        activation: Option<UnaryOp>,
    ) -> Result<Tensor> {
        let (&[n, c, _, _], &[o, wc, kh, kw]) = (self.shape(), weight.shape()) else {
            return Err(shape_error(format!(
                "input must be [n, c, h, w] and weight [out, c, kh, kw], got {:?} and {:?}",
                self.shape(),
                weight.shape()
            )));
        };
        if wc != c {
            return Err(shape_error(format!(
                "input {:?} has {c} channels, weight {:?} expects {wc}",
                self.shape(),
                weight.shape()
            )));
        }
        if let Some(b) = bias {
            if b.shape() != [o] {
                return Err(shape_error(format!(
                    "bias {:?} for {o} output channels",
                    b.shape()
                )));
            }
        }
        let padded = crate::no_grad(|| self.detach().pad2d(conv.padding))?;
        let geometry = ConvGeometry {
            n,
            c,
            h: padded.shape()[2],
            w: padded.shape()[3],
            kh,
            kw,
            stride: conv.stride,
            dilation: conv.dilation,
        };
        let (oh, ow) = geometry.output()?;
        let device = self.device();
        let rows = n * oh * ow;
        // Patches of 1 or 3 channels (c * kh * kw not a multiple of 4) would
        // keep the products from vec4 loads, several times slower on CPU
        // adapters: their rows get zero columns up to a multiple of 4, and
        // the weight as many (through pad2d, whose gradient drops them).
        let patch = geometry.patch();
        let width = patch.next_multiple_of(4);
        let padded_weight;
        let weight = if width == patch {
            weight
        } else {
            padded_weight = weight
                .reshape(&[o, patch])?
                .pad2d_with([[0, 0], [0, width - patch]], 0.0)?;
            &padded_weight
        };
        let cols = Tensor::from_buffer(
            device,
            device.im2col(padded.buffer(), &geometry, width)?,
            &[rows, width],
        )?;
        // [rows, width] x [o, width]^T, plus the bias per output channel (a
        // column here) as the product is stored.
        let spec = Matmul::new(rows, o, width).transpose_b(true);
        // [n, oh, ow, o] -> [n, o, oh, ow]
        let to_nchw = |y: &kiln_device::GpuBuffer| -> Result<Tensor> {
            let strides = [oh * ow * o, 1, ow * o, o];
            let out = device.strided_copy(y, &[n, o, oh, ow], &strides, 0)?;
            Tensor::from_buffer(device, out, &[n, o, oh, ow])
        };
        let plain = || device.matmul(cols.buffer(), weight.buffer(), &spec);
        let (expr, scalars) = bias_then(activation);
        // The activation's derivative, of the incoming gradient (x0) and the
        // output (x1).
        let partial = activation.and_then(output_derivative);
        let out = match bias {
            // The product stores its rows of channels as NCHW planes, adding
            // the bias per channel (and the activation) as it goes.
            Some(b) if b.buffer().dtype() == DType::F32 => {
                let epilogue = Epilogue {
                    op: Elementwise::new("conv_bias", &expr).scalars(&scalars),
                    operand: EpilogueOperand::Column(b.buffer()),
                };
                let planes = device.matmul_fused_planar(
                    cols.buffer(),
                    weight.buffer(),
                    &spec,
                    &epilogue,
                    oh * ow,
                )?;
                Tensor::from_buffer(device, planes, &[n, o, oh, ow])?
            }
            Some(b) => {
                crate::no_grad(|| to_nchw(&plain()?)?.add(&b.detach().reshape(&[o, 1, 1])?))?
            }
            None => to_nchw(&plain()?)?,
        };
        let output = partial.is_some().then(|| out.detach());

        let w = weight.detach();
        let weight_shape = weight.shape().to_vec();
        let input_shape = self.shape().to_vec();
        let pad = conv.padding;
        let has_bias = bias.is_some();
        let mut inputs = vec![self, weight];
        if let Some(b) = bias {
            inputs.push(b);
        }
        let (need_dx, need_dw) = (self.is_requires_grad(), weight.is_requires_grad());
        Ok(record(&inputs, out, "conv2d", move |g| {
            let device = g.device();
            // [n, o, oh, ow] -> [rows, o], through the activation's derivative
            // (of g and the output, read through the same view) if fused.
            let (rows_view, view) = ([n, oh, ow, o], [o * oh * ow, ow, 1, oh * ow]);
            let g2 = match (&partial, &output) {
                (Some(partial), Some(y)) => {
                    let op = Elementwise::new("conv2d_grad", partial).scalars(&scalars);
                    let at = |buffer| View {
                        buffer,
                        strides: &view,
                        offset: 0,
                    };
                    device.elementwise_views(&op, &[at(g.buffer()), at(y.buffer())], &rows_view)?
                }
                _ => device.strided_copy(g.buffer(), &rows_view, &view, 0)?,
            };
            // Frozen weights and inputs that need no gradient (the data, for a
            // first layer) skip their products: the input gradient is a matmul
            // plus a col2im, as costly as the forward pass.
            // The two products only read g2 and the forward's operands: one
            // dispatch where they fuse.
            let g2 = Tensor::from_buffer(device, g2, &[rows, o])?;
            let (dw, dcols, db) = device.together(|| {
                // The bias gradient sums g2's columns: independent too.
                let db = has_bias.then(|| g2.sum(0, false)).transpose()?;
                let g2 = g2.buffer();
                let dw = need_dw
                    .then(|| {
                        let spec = Matmul::new(o, width, rows).transpose_a(true);
                        device.matmul(g2, cols.buffer(), &spec)
                    })
                    .transpose()?;
                let dcols = need_dx
                    .then(|| device.matmul(g2, w.buffer(), &Matmul::new(rows, width, o)))
                    .transpose()?;
                Ok((dw, dcols, db))
            })?;
            let dw = dw
                .map(|dw| Tensor::from_buffer(device, dw, &weight_shape))
                .transpose()?;
            let dx = if let Some(dcols) = dcols {
                let dxp = device.col2im(&dcols, &geometry, width)?;
                Some(if pad == [0, 0] {
                    Tensor::from_buffer(device, dxp, &input_shape)?
                } else {
                    let (hp, wp) = (geometry.h, geometry.w);
                    let inner = device.strided_copy(
                        &dxp,
                        &input_shape,
                        &[c * hp * wp, hp * wp, wp, 1],
                        pad[0] * wp + pad[1],
                    )?;
                    Tensor::from_buffer(device, inner, &input_shape)?
                })
            } else {
                None
            };
            let mut grads = vec![dx, dw];
            if has_bias {
                grads.push(db);
            }
            Ok(grads)
        }))
    }
}

/// Window shape of a pooling op.
fn pool_geometry(
    t: &Tensor,
    kernel: [usize; 2],
    stride: [usize; 2],
    op: &'static str,
) -> Result<ConvGeometry> {
    let &[n, c, h, w] = t.shape() else {
        return Err(DeviceError::Shape {
            op,
            message: format!("input must be [n, c, h, w], got {:?}", t.shape()),
        });
    };
    if kernel.contains(&0) || stride.contains(&0) {
        return Err(DeviceError::Shape {
            op,
            message: format!("kernel {kernel:?} and stride {stride:?} must be positive"),
        });
    }
    Ok(ConvGeometry {
        n,
        c,
        h,
        w,
        kh: kernel[0],
        kw: kernel[1],
        stride,
        dilation: [1, 1],
    })
}

impl Tensor {
    /// The windows of an `[n, c, h, w]` tensor as rows: `[n * oh * ow, c * kh * kw]`
    /// (im2col). Its gradient sums overlapping windows back (col2im).
    pub fn unfold2d(&self, geometry: ConvGeometry) -> Result<Tensor> {
        let (oh, ow) = geometry.output()?;
        let device = self.device();
        let cols = device.im2col(self.buffer(), &geometry, geometry.patch())?;
        let shape = [geometry.n * oh * ow, geometry.patch()];
        let out = Tensor::from_buffer(device, cols, &shape)?;
        let input_shape = self.shape().to_vec();
        Ok(record(&[self], out, "unfold2d", move |g| {
            let dx = g.device().col2im(g.buffer(), &geometry, geometry.patch())?;
            Ok(vec![Some(Tensor::from_buffer(
                g.device(),
                dx,
                &input_shape,
            )?)])
        }))
    }

    fn pool2d(
        &self,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: Padding,
        max: bool,
    ) -> Result<Tensor> {
        let op = if max { "max_pool2d" } else { "avg_pool2d" };
        pool_geometry(self, kernel, stride, op)?;
        let (h, w) = (self.shape()[2], self.shape()[3]);
        let pads = [
            padding.amounts(h, kernel[0], stride[0]),
            padding.amounts(w, kernel[1], stride[1]),
        ];
        // Padding with the lowest finite value keeps it out of every maximum
        // (each window holds at least one real cell).
        let fill = if max { f32::MIN } else { 0.0 };
        let input = self.pad2d_with(pads, fill)?;
        let g = pool_geometry(&input, kernel, stride, op)?;
        let (oh, ow) = g.output()?;
        if max {
            // One kernel each way; the padding's own backward crops the
            // gradient back to the input.
            let device = self.device();
            let (values, argmax) = device.max_pool2d(input.buffer(), &g)?;
            let out = Tensor::from_buffer(device, values, &[g.n, g.c, oh, ow])?;
            let padded_shape = input.shape().to_vec();
            return Ok(record(&[&input], out, op, move |grad| {
                let device = grad.device();
                let dx = device.max_pool2d_backward(grad.buffer(), &argmax, &g)?;
                Ok(vec![Some(Tensor::from_buffer(device, dx, &padded_shape)?)])
            }));
        }
        // [n*oh*ow, c*kh*kw] -> [n*oh*ow*c, kh*kw]: one row per window.
        let windows = input
            .unfold2d(g)?
            .reshape(&[g.n * oh * ow * g.c, g.kh * g.kw])?;
        let pooled = windows
            .mean(1, false)?
            .reshape(&[g.n, oh, ow, g.c])?
            .permute(&[0, 3, 1, 2])?;
        if pads == [[0, 0], [0, 0]] {
            return Ok(pooled);
        }
        // Averages over the real cells only: rescale each position's mean by
        // window size / real cells in it.
        let real = |o: usize, d: usize, size: usize| {
            let start = (o * stride[d]) as isize - pads[d][0] as isize;
            let end = (start + kernel[d] as isize).min(size as isize);
            (end - start.max(0)) as f32
        };
        let area = (kernel[0] * kernel[1]) as f32;
        let scale: Vec<f32> = (0..oh)
            .flat_map(|y| (0..ow).map(move |x| (y, x)))
            .map(|(y, x)| area / (real(y, 0, h) * real(x, 1, w)))
            .collect();
        pooled.mul(&Tensor::from_slice(self.device(), &scale, &[oh, ow])?)
    }

    /// Max pooling without padding (Keras `MaxPooling2D`, "valid"); the gradient
    /// goes to each window's maximum (the first of equal ones, as in PyTorch).
    pub fn max_pool2d(&self, kernel: [usize; 2], stride: [usize; 2]) -> Result<Tensor> {
        self.pool2d(kernel, stride, Padding::Valid, true)
    }

    /// Max pooling with a choice of border handling (see [`Padding`]).
    pub fn max_pool2d_padded(
        &self,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: Padding,
    ) -> Result<Tensor> {
        self.pool2d(kernel, stride, padding, true)
    }

    /// Average pooling without padding.
    pub fn avg_pool2d(&self, kernel: [usize; 2], stride: [usize; 2]) -> Result<Tensor> {
        self.pool2d(kernel, stride, Padding::Valid, false)
    }

    /// Average pooling with a choice of border handling (see [`Padding`]);
    /// with `Same`, padded cells are not counted.
    pub fn avg_pool2d_padded(
        &self,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: Padding,
    ) -> Result<Tensor> {
        self.pool2d(kernel, stride, padding, false)
    }

    /// Mean over the spatial dims: `[n, c, h, w] -> [n, c]`.
    pub fn global_avg_pool2d(&self) -> Result<Tensor> {
        let &[n, c, h, w] = self.shape() else {
            return Err(DeviceError::Shape {
                op: "global_avg_pool2d",
                message: format!("input must be [n, c, h, w], got {:?}", self.shape()),
            });
        };
        self.reshape(&[n, c, h * w])?.mean(2, false)
    }

    /// Keeps the first dim and merges the rest: `[n, ...] -> [n, prod(...)]`.
    pub fn flatten(&self) -> Result<Tensor> {
        let (n, rest) = match self.shape() {
            [] => (1, 1),
            // Not numel / n: an empty batch keeps its feature count.
            [n, rest @ ..] => (*n, crate::tensor::numel_of(rest)),
        };
        self.reshape(&[n, rest])
    }
}
