//! Packing guarantees: every packed file fits its budget, packing refuses exactly when
//! the real file cannot fit, exact sizes are known before packing, and f32 weights
//! survive packing bit for bit.

use ccnet_host::pack::{pack, packed_len, FloatModel, PackError, PackInfo, Quant};
use ccnet_host::weights::key;
use ccnet_models::Arch;
use ccnet_shared::format::{Container, InputGeometry, Metadata};
use ccnet_shared::graph::Graph;
use ccnet_tests::random_float_model;
use proptest::prelude::*;

fn deployed(arch: Arch, den: u32, channels: u32, seed: u64) -> FloatModel {
    random_float_model(arch, den, channels, seed)
}

fn info(channels: u32) -> PackInfo<'static> {
    PackInfo {
        input: InputGeometry {
            channels,
            height: 64,
            width: 64,
            scale: 1.0,
            offset: 0.0,
            standardize: false,
        },
        metadata: Metadata {
            arch: "x",
            dataset: "generated",
            alpha_num: 1,
            alpha_den: 8,
            ..Metadata::default()
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn packed_files_fit_and_refusals_are_exact(
        arch_i in 0usize..3,
        den in prop::sample::select(vec![16u32, 32, 64]),
        channels in prop::sample::select(vec![1u32, 3]),
        f16 in any::<bool>(),
        budget_ratio in 0.8f64..1.2,
        seed in any::<u64>(),
    ) {
        let arch = Arch::ALL[arch_i];
        let quant = if f16 { Quant::F16 } else { Quant::F32 };
        let model = deployed(arch, den, channels, seed);
        let exact = packed_len(&model.graph, quant, &info(channels)).unwrap();
        let budget = ((exact as f64 * budget_ratio) as u64).max(1);
        match pack(&model, quant, Some(budget), &info(channels)) {
            Ok(bytes) => {
                prop_assert!(bytes.len() as u64 <= budget);
                prop_assert_eq!(bytes.len() as u64, exact);
                prop_assert!(Container::parse(&bytes).is_ok());
            }
            Err(PackError::OverBudget { file_bytes, budget: b, over, .. }) => {
                prop_assert_eq!(file_bytes, exact);
                prop_assert!(file_bytes > b);
                prop_assert_eq!(over, file_bytes - b);
            }
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
        // Exactly at the limit it fits; one byte less it does not.
        prop_assert!(pack(&model, quant, Some(exact), &info(channels)).is_ok());
        let refused = matches!(
            pack(&model, quant, Some(exact - 1), &info(channels)),
            Err(PackError::OverBudget { .. })
        );
        prop_assert!(refused);
    }
}

#[test]
fn f32_weights_survive_packing_exactly() {
    let model = deployed(Arch::Unet, 16, 1, 42);
    let bytes = pack(&model, Quant::F32, None, &info(1)).unwrap();
    let c = Container::parse(&bytes).unwrap();
    let g = Graph::new_unchecked(&model.graph);
    assert_eq!(c.header().graph.as_slice(), model.graph.as_slice());
    for (i, t) in c.tensors().iter().enumerate() {
        let name = key(&g, t.node, t.role).unwrap();
        let stored: Vec<f32> = c
            .tensor_bytes(i)
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(stored, model.weights[&name].values, "{name}");
    }
    assert_eq!(c.tensors().len(), model.weights.len());
}

#[test]
fn over_budget_message_shows_the_numbers() {
    let model = deployed(Arch::Unet, 8, 1, 1);
    let err = pack(&model, Quant::F16, Some(100_000), &info(1))
        .unwrap_err()
        .to_string();
    let params = Graph::new_unchecked(&model.graph).trainable_params();
    assert!(
        err.contains(&format!("{params} parameters at 16 bits")),
        "{err}"
    );
    assert!(err.contains("over the budget of 100000 bytes"), "{err}");
}
