//! Fused GELU (tanh), SiLU and last-axis softmax on the CPU backend.
//!
//! The model is generic over burn backends. When the backend is burn's CPU
//! backend (`Flex`, or `Autodiff<Flex>` in training) these ops run the
//! one-pass kernels of [`crate::cpu_kernels`], with their own backward step
//! registered in the autodiff graph; the caller falls back to burn's ops on
//! any other backend (GPU backends fuse elementwise chains themselves), on
//! other float types and under a checkpointing strategy.
//!
//! The backend is recognised by type (`Any`), a no-op after monomorphisation.

use core::any::{Any, TypeId};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, DType, Tensor, TensorPrimitive};
use burn_flex::{Flex, FlexTensor, Layout};

use crate::cpu_kernels;

/// `t` as a `U` when `T` and `U` are the same type, `t` back otherwise.
pub(crate) fn same_type<T: 'static, U: 'static>(t: T) -> Result<U, T> {
    let mut slot = Some(t);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<U>>() {
        Some(u) => Ok(u.take().expect("filled above")),
        None => Err(slot.expect("untouched")),
    }
}

/// `t` as `U`, where the caller knows that `T` is `U`.
pub(crate) fn cast<T: 'static, U: 'static>(t: T) -> U {
    same_type(t).unwrap_or_else(|_| unreachable!("{} is {}", core::any::type_name::<T>(), core::any::type_name::<U>()))
}

/// Whether `B` is burn's CPU backend, `Flex` or `Autodiff<Flex>`.
pub(crate) fn is_cpu<B: Backend>() -> bool {
    let id = TypeId::of::<B>();
    id == TypeId::of::<Flex>() || id == TypeId::of::<Autodiff<Flex>>()
}

/// The CPU backend's tensor behind `x` when `B` is `Flex` and `x` holds f32
/// (for kernels outside this crate), `x` back otherwise.
pub fn flex_f32<B: Backend, const D: usize>(x: Tensor<B, D>) -> Result<FlexTensor, Tensor<B, D>> {
    if x.dtype() != DType::F32 {
        return Err(x);
    }
    same_type::<_, Tensor<Flex, D>>(x).map(|x| x.into_primitive().tensor())
}

/// `t` as a tensor of `B`.
///
/// # Panics
/// If `B` is not `Flex` (pair with [`flex_f32`]).
pub fn from_flex<B: Backend, const D: usize>(t: FlexTensor) -> Tensor<B, D> {
    same_type(Tensor::<Flex, D>::from_primitive(TensorPrimitive::Float(t)))
        .unwrap_or_else(|_| panic!("from_flex on the {} backend", core::any::type_name::<B>()))
}

/// An elementwise activation with CPU kernels; its backward step keeps the
/// input.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pointwise {
    /// `x = f(x)`.
    forward_in_place: fn(&mut [f32]),
    /// `y = f(x)`.
    forward: fn(&[f32], &mut [f32]),
    /// `dx = g * f'(x)`.
    backward: fn(&[f32], &[f32], &mut [f32]),
}

/// GELU with the tanh approximation.
pub(crate) const GELU_TANH: Pointwise = Pointwise {
    forward_in_place: cpu_kernels::gelu_tanh_in_place,
    forward: cpu_kernels::gelu_tanh,
    backward: cpu_kernels::gelu_tanh_backward,
};

/// SiLU, `x * sigmoid(x)`.
pub(crate) const SILU: Pointwise = Pointwise {
    forward_in_place: cpu_kernels::silu_in_place,
    forward: cpu_kernels::silu,
    backward: cpu_kernels::silu_backward,
};

/// `Ok(op(x))` on the CPU backend with f32 data, `Err(x)` otherwise.
pub(crate) fn pointwise<B: Backend, const D: usize>(
    op: Pointwise,
    x: Tensor<B, D>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    on_cpu(x, |x| flex_pointwise(op, x), |x| autodiff_pointwise(op, x))
}

/// `Ok(softmax(x, D - 1))` on the CPU backend with f32 data, `Err(x)`
/// otherwise.
pub(crate) fn softmax_last<B: Backend, const D: usize>(x: Tensor<B, D>) -> Result<Tensor<B, D>, Tensor<B, D>> {
    on_cpu(x, flex_softmax, autodiff_softmax)
}

/// The f32 values of `x` in row-major order, without autodiff, when `B` is
/// `Flex` or `Autodiff<Flex>` (no device transfer, at most a copy of a
/// strided view).
pub(crate) fn cpu_values<B: Backend, const D: usize>(x: &Tensor<B, D>) -> Option<FlexTensor> {
    if x.dtype() != DType::F32 {
        return None;
    }
    if let Ok(t) = same_type::<_, Tensor<Flex, D>>(x.clone()) {
        return Some(flex_contiguous(t.into_primitive().tensor()));
    }
    same_type::<_, Tensor<Autodiff<Flex>, D>>(x.clone())
        .ok()
        .map(|t| flex_contiguous(t.into_primitive().tensor().primitive))
}

/// Runs `flex` or `autodiff` on `x` when `B` is `Flex` or `Autodiff<Flex>`
/// and `x` holds f32.
pub(crate) fn on_cpu<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    flex: impl FnOnce(FlexTensor) -> FlexTensor,
    autodiff: impl FnOnce(Tensor<Autodiff<Flex>, D>) -> Tensor<Autodiff<Flex>, D>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if x.dtype() != DType::F32 {
        return Err(x);
    }
    let x = match flex_f32(x) {
        Ok(x) => return Ok(from_flex(flex(x))),
        Err(x) => x,
    };
    match same_type::<_, Tensor<Autodiff<Flex>, D>>(x) {
        Ok(x) => Ok(cast(autodiff(x))),
        Err(x) => Err(x),
    }
}

/// Runs `flex` or `autodiff` on `(lhs, rhs)` when `B` is `Flex` or
/// `Autodiff<Flex>` and both hold f32.
pub(crate) fn on_cpu_pair<B: Backend, const D: usize>(
    lhs: Tensor<B, D>,
    rhs: Tensor<B, D>,
    flex: impl FnOnce(FlexTensor, FlexTensor) -> FlexTensor,
    autodiff: impl FnOnce(Tensor<Autodiff<Flex>, D>, Tensor<Autodiff<Flex>, D>) -> Tensor<Autodiff<Flex>, D>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    if lhs.dtype() != DType::F32 || rhs.dtype() != DType::F32 {
        return Err((lhs, rhs));
    }
    let backend = TypeId::of::<B>();
    if backend == TypeId::of::<Flex>() {
        let (lhs, rhs): (Tensor<Flex, D>, Tensor<Flex, D>) = (cast(lhs), cast(rhs));
        return Ok(from_flex(flex(lhs.into_primitive().tensor(), rhs.into_primitive().tensor())));
    }
    if backend == TypeId::of::<Autodiff<Flex>>() {
        return Ok(cast(autodiff(cast(lhs), cast(rhs))));
    }
    Err((lhs, rhs))
}

/// Runs `flex` or `autodiff` on `(a, b, c)` when `B` is `Flex` or
/// `Autodiff<Flex>`, all three hold f32 and the activations have elements.
#[allow(clippy::type_complexity)]
pub(crate) fn on_cpu3<B: Backend, const D: usize>(
    a: Tensor<B, 3>,
    b: Tensor<B, 2>,
    c: Tensor<B, D>,
    flex: impl FnOnce(FlexTensor, FlexTensor, FlexTensor) -> FlexTensor,
    autodiff: impl FnOnce(
        Tensor<Autodiff<Flex>, 3>,
        Tensor<Autodiff<Flex>, 2>,
        Tensor<Autodiff<Flex>, D>,
    ) -> Tensor<Autodiff<Flex>, 3>,
) -> Result<Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 2>, Tensor<B, D>)> {
    let f32s = [a.dtype(), b.dtype(), c.dtype()].iter().all(|&d| d == DType::F32);
    if !f32s || a.shape().num_elements() == 0 {
        return Err((a, b, c));
    }
    let backend = TypeId::of::<B>();
    if backend == TypeId::of::<Flex>() {
        let (a, b, c): (Tensor<Flex, 3>, Tensor<Flex, 2>, Tensor<Flex, D>) = (cast(a), cast(b), cast(c));
        let prim = |t: TensorPrimitive<Flex>| t.tensor();
        return Ok(from_flex(flex(prim(a.into_primitive()), prim(b.into_primitive()), prim(c.into_primitive()))));
    }
    if backend == TypeId::of::<Autodiff<Flex>>() {
        return Ok(cast(autodiff(cast(a), cast(b), cast(c))));
    }
    Err((a, b, c))
}

/// `x` with its f32 elements exactly covering its buffer in row-major order:
/// `x` itself when it already does, a copy of a view otherwise.
pub fn flex_contiguous(x: FlexTensor) -> FlexTensor {
    let whole =
        x.is_contiguous() && x.layout().start_offset() == 0 && x.storage::<f32>().len() == x.layout().num_elements();
    if whole {
        x
    } else {
        x.to_contiguous()
    }
}

/// A contiguous f32 tensor of `shape` that takes over `data` as its buffer
/// (for kernels outside this crate).
///
/// # Panics
/// If `data` does not hold `shape`'s number of elements.
pub fn flex_from_vec(data: Vec<f32>, shape: burn::tensor::Shape) -> FlexTensor {
    assert_eq!(data.len(), shape.num_elements(), "flex_from_vec: {} elements for shape {shape:?}", data.len());
    FlexTensor::new(burn::tensor::Bytes::from_elems(data), Layout::contiguous(shape), DType::F32)
}

/// A new contiguous f32 tensor of `shape` filled by `fill`.
fn new_f32(shape: burn::tensor::Shape, fill: impl FnOnce(&mut [f32])) -> FlexTensor {
    let mut out = vec![0.0f32; shape.num_elements()];
    fill(&mut out);
    flex_from_vec(out, shape)
}

fn flex_pointwise(op: Pointwise, x: FlexTensor) -> FlexTensor {
    let mut x = flex_contiguous(x);
    if let Some(data) = x.try_storage_mut::<f32>() {
        (op.forward_in_place)(data);
        return x;
    }
    new_f32(x.layout().shape().clone(), |y| (op.forward)(x.storage(), y))
}

fn flex_softmax(x: FlexTensor) -> FlexTensor {
    let mut y = flex_contiguous(x);
    let shape = y.layout().shape().clone();
    let row = shape[shape.num_dims() - 1];
    if shape.num_elements() > 0 {
        // In place when `y` is the only holder of its buffer, on a copy otherwise.
        cpu_kernels::softmax_in_place(y.storage_mut(), row);
    }
    y
}

/// Backward step of a pointwise op: keeps the input.
#[derive(Debug)]
struct PointwiseBackward(Pointwise);

impl Backward<Flex, 1> for PointwiseBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let x = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |g| {
            let g = flex_contiguous(g);
            new_f32(x.layout().shape().clone(), |dx| (self.0.backward)(x.storage(), g.storage(), dx))
        });
    }
}

/// Backward step of softmax: keeps the output.
#[derive(Debug)]
struct SoftmaxBackward;

impl Backward<Flex, 1> for SoftmaxBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let y = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |g| {
            let g = flex_contiguous(g);
            let shape = y.layout().shape().clone();
            let row = shape[shape.num_dims() - 1];
            new_f32(shape, |dx| cpu_kernels::softmax_backward(y.storage(), g.storage(), dx, row))
        });
    }
}

fn autodiff_pointwise<const D: usize>(op: Pointwise, x: Tensor<Autodiff<Flex>, D>) -> Tensor<Autodiff<Flex>, D> {
    let x = x.into_primitive().tensor();
    let out = match PointwiseBackward(op).prepare::<NoCheckpointing>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let input = flex_contiguous(x.primitive);
            let y = new_f32(input.layout().shape().clone(), |y| (op.forward)(input.storage(), y));
            prep.finish(input, y)
        }
        OpsKind::UnTracked(prep) => prep.finish(flex_pointwise(op, x.primitive)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

fn autodiff_softmax<const D: usize>(x: Tensor<Autodiff<Flex>, D>) -> Tensor<Autodiff<Flex>, D> {
    let x = x.into_primitive().tensor();
    let out = match SoftmaxBackward.prepare::<NoCheckpointing>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let y = flex_softmax(x.primitive);
            prep.finish(y.clone(), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(flex_softmax(x.primitive)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{activation, Distribution, Tolerance};

    type Ad = Autodiff<Flex>;

    fn composite_gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
        let u = (x.clone() + x.clone().powi_scalar(3).mul_scalar(0.044715))
            .mul_scalar((2.0 / core::f64::consts::PI).sqrt());
        x.mul_scalar(0.5) * u.tanh().add_scalar(1.0)
    }

    #[test]
    fn cpu_ops_equal_burn_ops_forward_and_backward() {
        let device = Default::default();
        let x = Tensor::<Ad, 3>::random([3, 5, 37], Distribution::Normal(0.0, 2.0), &device).require_grad();
        let w = Tensor::<Ad, 3>::random([3, 5, 37], Distribution::Normal(0.0, 1.0), &device);
        // Output and input gradient of `op` on a strided view of `x`, as
        // attention scores and MLP activations can be (each backward pass
        // consumes its graph, so every call builds its own).
        let run = |op: &dyn Fn(Tensor<Ad, 3>) -> Tensor<Ad, 3>| {
            let y = op(x.clone().swap_dims(1, 2));
            let grads = (y.clone() * w.clone().swap_dims(1, 2)).sum().backward();
            (y.inner(), x.grad(&grads).expect("x takes part in the graph"))
        };
        let cpu = |r: Result<Tensor<Ad, 3>, Tensor<Ad, 3>>| {
            r.unwrap_or_else(|_| panic!("Autodiff<Flex> takes the CPU kernel"))
        };
        let fused_ops: [&dyn Fn(Tensor<Ad, 3>) -> Tensor<Ad, 3>; 3] =
            [&|x| cpu(pointwise(GELU_TANH, x)), &|x| cpu(pointwise(SILU, x)), &|x| cpu(softmax_last(x))];
        let burn_ops: [&dyn Fn(Tensor<Ad, 3>) -> Tensor<Ad, 3>; 3] =
            [&composite_gelu, &|x| x.clone() * activation::sigmoid(x), &|x| activation::softmax(x, 2)];
        for (fused, reference) in fused_ops.into_iter().zip(burn_ops) {
            let (y, dx) = run(fused);
            let (y_ref, dx_ref) = run(reference);
            y.into_data().assert_approx_eq::<f32>(&y_ref.into_data(), Tolerance::absolute(2e-6));
            dx.into_data().assert_approx_eq::<f32>(&dx_ref.into_data(), Tolerance::absolute(1e-5));
        }
        // Without autodiff, in place on a unique tensor and copied on a shared one.
        let plain = x.clone().inner();
        let kept = plain.clone();
        let y = pointwise(GELU_TANH, plain).unwrap_or_else(|_| panic!("Flex takes the CPU kernel"));
        y.into_data().assert_approx_eq::<f32>(&composite_gelu(kept.clone()).into_data(), Tolerance::absolute(2e-6));
        kept.into_data().assert_eq(&x.clone().inner().into_data(), true);
    }

    #[test]
    fn other_float_types_fall_back() {
        let device = Default::default();
        let x = Tensor::<Flex, 2>::ones([2, 3], &device).cast(burn::tensor::FloatDType::F64);
        assert!(softmax_last(x).is_err());
    }
}
