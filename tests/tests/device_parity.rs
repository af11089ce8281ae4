//! Device f32 against the candle executor: the same graph and weights (random, with
//! non-zero biases), logits within 1e-4 relative, for every architecture.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use ccnet_device::{Input, InputData, Model};
use ccnet_host::container::{write, ModelSpec, TensorData};
use ccnet_host::train::executor::{tensor_name, Network};
use ccnet_host::train::rng::Rng;
use ccnet_models::{build, Arch, ArchConfig};
use ccnet_shared::alpha::Alpha;
use ccnet_shared::format::{InputGeometry, Metadata};
use ccnet_shared::graph::{Graph, NodeId, ParamRole};

#[test]
fn device_f32_matches_candle_within_1e_4() {
    for (arch, h, w) in [
        (Arch::Unet, 32, 48),
        (Arch::Fcn, 64, 32),
        (Arch::Cumed, 40, 24),
    ] {
        let cfg = ArchConfig::new(arch, Alpha::new(1, 16).unwrap());
        let nodes = build(&cfg).unwrap();
        let graph = Graph::new(&nodes).unwrap();
        let dev = Device::Cpu;
        let mut rng = Rng::new(11, 3);
        let net = Network::new(&nodes, &dev, &mut rng).unwrap();
        // Non-zero biases, so they are checked too.
        let mut tensors: HashMap<String, Tensor> = net.tensors().into_iter().collect();
        for (name, t) in tensors.iter_mut() {
            if name.ends_with(".bias") {
                let n = t.elem_count();
                let v: Vec<f32> = (0..n).map(|_| rng.range_f(-0.2, 0.2) as f32).collect();
                *t = Tensor::from_vec(v, n, &dev).unwrap();
            } else {
                // A fresh copy: candle refuses to set a variable from its own storage.
                *t = t.copy().unwrap();
            }
        }
        net.load(&tensors, "test").unwrap();

        let mut data = Vec::new();
        for (id, op) in nodes.iter().enumerate() {
            for &(role, dims) in op.param_tensors().as_slice() {
                let name = tensor_name(&graph, id, role).unwrap();
                let v: Vec<f32> = tensors[&name].flatten_all().unwrap().to_vec1().unwrap();
                data.push(TensorData::f32(id as NodeId, role, dims, &v));
            }
        }
        assert!(data.iter().any(|t| t.role == ParamRole::Bias));
        let spec = ModelSpec {
            graph: &nodes,
            activations: &[],
            input: InputGeometry {
                channels: 1,
                height: h,
                width: w,
                scale: 1.0,
                offset: 0.0,
                standardize: false,
            },
            metadata: Metadata::default(),
        };
        let bytes = write(&spec, &data).unwrap();
        let model = Model::parse(&bytes).unwrap();

        let x: Vec<f32> = (0..h * w)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let xt = Tensor::from_vec(x.clone(), (1, 1, h as usize, w as usize), &dev).unwrap();
        let want: Vec<f32> = net
            .forward(&xt, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();

        let logits = (nodes.len() - 2) as NodeId;
        let mut arena = vec![0u8; model.arena_bytes(h, w).unwrap()];
        let mut got = vec![0f32; want.len()];
        let input = Input {
            data: InputData::F32(&x),
            height: h,
            width: w,
        };
        model.run_node(input, &mut arena, logits, &mut got).unwrap();
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.1, "{arch}: degenerate logits");
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs() / scale)
            .fold(0f32, f32::max);
        eprintln!("{arch}: max |device − candle| / max|logit| = {worst:.2e}");
        assert!(worst <= 1e-4, "{arch}: relative error {worst}");
    }
}
