//! The candle executor agrees with the graph IR: parameter counts, tensor names and
//! shapes, and output shapes, for every architecture with and without batch norm.

use candle_core::{Device, Tensor};
use ccnet_host::train::executor::{tensor_name, Network};
use ccnet_host::train::rng::Rng;
use ccnet_models::{build, Arch, ArchConfig};
use ccnet_shared::alpha::Alpha;
use ccnet_shared::graph::{Graph, Op, Shape, MAX_NODES};

#[test]
fn executor_matches_graph_for_every_architecture() {
    let alpha = Alpha::new(1, 16).unwrap();
    for arch in Arch::ALL {
        for batch_norm in [false, true] {
            for in_channels in [1, 3] {
                let cfg = ArchConfig {
                    arch,
                    alpha,
                    in_channels,
                    classes: 2,
                    batch_norm,
                };
                let nodes = build(&cfg).unwrap();
                let g = Graph::new(&nodes).unwrap();
                let net = Network::new(&nodes, &Device::Cpu, &mut Rng::new(1, 2)).unwrap();
                let what = format!("{arch} bn={batch_norm} c={in_channels}");
                // Trainable scalars held by candle == the graph's count.
                assert_eq!(net.trainable_count(), g.trainable_params(), "{what}");
                // Every parameter tensor of the IR exists under its stable name with the
                // IR's element count; nothing else exists.
                let mut expected = 0;
                for (id, op) in nodes.iter().enumerate() {
                    for &(role, dims) in op.param_tensors().as_slice() {
                        let name = tensor_name(&g, id, role).unwrap();
                        let var = net
                            .params()
                            .get(&name)
                            .unwrap_or_else(|| panic!("{what}: missing {name}"));
                        let n: u32 = dims.iter().product();
                        assert_eq!(var.elem_count(), n as usize, "{what}: {name}");
                        expected += 1;
                    }
                }
                assert_eq!(net.params().len(), expected, "{what}");
                if batch_norm {
                    assert!(net.params().contains_key("bn00.running_mean"), "{what}");
                    assert!(net.params().contains_key("bn00.running_var"), "{what}");
                }
                assert!(net.params().contains_key("conv00.weight"), "{what}");
                // Output shapes equal shape inference, for a non-square input.
                let m = arch.input_multiple();
                let (h, w) = (2 * m.max(32), m.max(32));
                let mut shapes = [Shape::default(); MAX_NODES];
                g.infer_shapes(h, w, &mut shapes).unwrap();
                let logits_id = match nodes.last().unwrap() {
                    Op::Argmax { input } => *input as usize,
                    _ => nodes.len() - 1,
                };
                let s = shapes[logits_id];
                let x = Tensor::zeros(
                    (2, in_channels as usize, h as usize, w as usize),
                    candle_core::DType::F32,
                    &Device::Cpu,
                )
                .unwrap();
                for train in [false, true] {
                    let y = net.forward(&x, train).unwrap();
                    assert_eq!(
                        y.dims(),
                        &[2, s.c as usize, s.h as usize, s.w as usize],
                        "{what} train={train}"
                    );
                    assert_eq!((s.h, s.w), (h, w), "{what}");
                }
            }
        }
    }
}

#[test]
fn wrong_input_channels_is_an_error() {
    let nodes = build(&ArchConfig::new(Arch::Cumed, Alpha::new(1, 16).unwrap())).unwrap();
    let net = Network::new(&nodes, &Device::Cpu, &mut Rng::new(0, 0)).unwrap();
    let x = Tensor::zeros((1, 3, 16, 16), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = net.forward(&x, false).unwrap_err().to_string();
    assert!(e.contains("3 channels"), "{e}");
}

#[test]
fn fast_up_convolution_equals_candle_conv_transpose() {
    use ccnet_host::train::executor::conv_transpose2d;
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 4), &dev).unwrap();
    for (k, s, p) in [(2, 2, 0), (3, 3, 0), (4, 2, 1)] {
        let w = Tensor::randn(0f32, 1.0, (3, 6, k, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 6, &dev).unwrap();
        let fast = conv_transpose2d(&x, &w, Some(&b), p, s).unwrap();
        let reference = x
            .conv_transpose2d(&w, p, 0, s, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, 6, 1, 1)).unwrap())
            .unwrap();
        assert_eq!(fast.dims(), reference.dims());
        let d = (fast - reference)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-4, "k={k} s={s}");
    }
}
