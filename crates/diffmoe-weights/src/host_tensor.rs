//! A tensor on the host: what every weight reader returns and every writer
//! takes, before it is uploaded to a device or after it is read back.

use burn::tensor::{backend::Backend, Tensor, TensorData};

/// A tensor on the host: row-major f32 values and a shape.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// The shape; empty for a 0-dim tensor.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values, row-major.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Reads a tensor back to the host.
    pub fn from_tensor<B: Backend, const D: usize>(t: Tensor<B, D>) -> Self {
        let shape = t.dims().to_vec();
        let data = t.into_data().convert::<f32>().to_vec().expect("a float tensor reads as f32");
        Self { shape, data }
    }

    /// Uploads to a device.
    ///
    /// # Panics
    /// If the shape does not have `D` dimensions or the values do not fill it.
    pub fn to_tensor<B: Backend, const D: usize>(&self, device: &B::Device) -> Tensor<B, D> {
        Tensor::from_data(TensorData::new(self.data.clone(), self.shape.clone()), device)
    }
}

/// The row-major `cols x rows` transpose of the row-major `rows x cols`
/// matrix `data` (PyTorch's `[d_output, d_input]` weights against burn's
/// `[d_input, d_output]`).
///
/// # Panics
/// If `data` does not hold `rows * cols` values.
pub fn transpose_matrix(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(data.len(), rows * cols, "a {rows} x {cols} matrix of {} values", data.len());
    (0..cols).flat_map(|c| (0..rows).map(move |r| data[r * cols + c])).collect()
}

impl From<(Vec<usize>, Vec<f32>)> for HostTensor {
    fn from((shape, data): (Vec<usize>, Vec<f32>)) -> Self {
        Self { shape, data }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn a_matrix_transposes() {
        assert_eq!(transpose_matrix(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3), [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }

    #[test]
    fn a_tensor_round_trips_through_the_host() {
        let device = Default::default();
        let host = HostTensor { shape: vec![2, 3], data: vec![0.5, -1.0, 2.0, 3.25, 0.0, -7.5] };
        let back = HostTensor::from_tensor(host.to_tensor::<Flex, 2>(&device));
        assert_eq!(back, host);
        assert_eq!(HostTensor::from((vec![], vec![4.0])), HostTensor { shape: vec![], data: vec![4.0] });
    }
}
