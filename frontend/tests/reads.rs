//! Reading weights: large tensors (converted on several threads) and reads after a prefetch give
//! exactly the stored values, whatever order the prefetch was told; a prefetch dropped early ends.

mod common;

use common::*;
use llmc_frontend::Checkpoint;
use llmc_ir::{Dim, TensorType, WeightSource};
use safetensors::Dtype;

/// A checkpoint with two 8 MiB tensors (above the multi-threaded conversion size) and a small one.
fn big_tensors() -> Tensors {
    let mut t = Tensors::new();
    let n = 2 << 20;
    t.insert("a".into(), (vec![n], (0..n).map(|i| (i as f32 * 0.37).sin()).collect()));
    t.insert("b".into(), (vec![1024, n / 1024], (0..n).map(|i| (i % 977) as f32 - 488.0).collect()));
    t.insert("c".into(), (vec![3], vec![1.0, -2.0, 0.5]));
    t
}

fn ty(shape: &[usize]) -> TensorType {
    TensorType::f32(shape.iter().map(|&d| Dim::N(d)).collect())
}

#[test]
fn large_tensors_and_prefetch_read_exact_values() {
    for dtype in [Dtype::F32, Dtype::BF16, Dtype::F16] {
        let dir = TempDir::new();
        let t = big_tensors();
        write_model(dir.path(), &serde_json::json!({}), &t, dtype);
        let want = rounded(&t, dtype);
        let (ck, _) = Checkpoint::open(dir.path()).unwrap();
        // Out of file order, with an unknown name and a repeat: advice only.
        let guard = ck.prefetch(&["b", "nope", "c", "a", "b"]);
        for name in ["b", "c", "a"] {
            let (shape, v) = &want[name];
            assert_eq!(&ck.load(name, &ty(shape)).unwrap(), v, "{name} as {dtype:?}");
        }
        drop(guard);
        // Read again without a prefetch, and with one dropped before any read.
        drop(ck.prefetch(&["a", "b", "c"]));
        for (name, (shape, v)) in &want {
            assert_eq!(&ck.load(name, &ty(shape)).unwrap(), v, "{name} as {dtype:?}, again");
        }
    }
}

#[test]
fn non_finite_value_in_a_large_tensor_is_located() {
    let dir = TempDir::new();
    let mut t = big_tensors();
    t.get_mut("a").unwrap().1[1_500_001] = f32::NAN;
    write_model(dir.path(), &serde_json::json!({}), &t, Dtype::F32);
    let (ck, _) = Checkpoint::open(dir.path()).unwrap();
    let e = ck.load("a", &ty(&[2 << 20])).unwrap_err().to_string();
    assert!(e.contains("flat index 1500001"), "{e}");
    assert!(ck.load("b", &ty(&[1024, 2048])).is_ok());
}
