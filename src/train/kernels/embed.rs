//! Gradient of an embedding lookup: dW [V, C] = Σ over positions of dy's row added into the row
//! of its id (ids [N] u32, dy [N, C] or [.., C] with N rows in all).

use candle_core::{DType, Device, Result, Tensor};

use super::simd;
use super::{rows_cols, with_cpu_f32};

pub fn embedding_bwd(ids: &Tensor, dy: &Tensor, vocab: usize) -> Result<Tensor> {
    let (n, c) = rows_cols(dy)?;
    if ids.elem_count() != n || ids.dtype() != DType::U32 {
        candle_core::bail!(
            "embedding: ids have shape {:?} ({:?}), expected {n} u32 (one per row of dy {:?})",
            ids.dims(),
            ids.dtype(),
            dy.dims()
        )
    }
    let idv = ids.flatten_all()?.to_vec1::<u32>()?;
    if let Some((i, id)) = idv.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        candle_core::bail!("embedding: ids[{i}] = {id} is not below the vocabulary size {vocab}")
    }
    // One pass over dy's rows, in order: the rows are few (tokens of one step) and short, and
    // two rows with the same id would race if split across threads.
    let fused = with_cpu_f32(&[dy], |s| {
        let mut dw = vec![0f32; vocab * c];
        for (&id, row) in idv.iter().zip(s[0].chunks_exact(c)) {
            let at = id as usize * c;
            simd::axpy(&mut dw[at..at + c], 1.0, row);
        }
        dw
    });
    if let Some(dw) = fused {
        return Tensor::from_vec(dw, (vocab, c), &Device::Cpu);
    }
    let ids = Tensor::new(idv, dy.device())?;
    Tensor::zeros((vocab, c), dy.dtype(), dy.device())?.index_add(&ids, &dy.reshape((n, c))?, 0)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{close, rand, strided};
    use super::*;
    use candle_core::Var;

    #[test]
    fn fused_composed_and_autograd_agree() {
        let (v, c) = (11, 12);
        // Repeated ids: their rows must add up.
        let ids = Tensor::new(&[[3u32, 0, 3, 10, 7], [7, 7, 1, 3, 2]], &Device::Cpu).unwrap();
        let w = rand(&[v, c], 1.0, 61).unwrap();
        let dy = rand(&[2, 5, c], 1.0, 62).unwrap();
        let wv = Var::from_tensor(&w).unwrap();
        let y = wv
            .as_tensor()
            .embedding(&ids.flatten_all().unwrap())
            .unwrap()
            .reshape((2, 5, c))
            .unwrap();
        let g = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let want = g.get(wv.as_tensor()).unwrap();
        close("fused", &embedding_bwd(&ids, &dy, v).unwrap(), want, 1e-6);
        close(
            "composed",
            &embedding_bwd(&ids, &strided(&dy), v).unwrap(),
            want,
            1e-6,
        );
        assert!(embedding_bwd(&ids, &dy, 10).is_err());
    }
}
