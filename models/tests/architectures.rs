//! Parameter counts against the paper, width scaling and builder errors.

use ccnet_models::{build, deployed_params, Arch, ArchConfig, ModelError};
use ccnet_shared::alpha::{Alpha, AlphaError};
use ccnet_shared::graph::{Graph, Op, Shape, MAX_NODES};

fn alpha(s: &str) -> Alpha {
    Alpha::parse(s).unwrap()
}

#[test]
fn base_parameter_counts_match_the_paper() {
    for arch in Arch::ALL {
        let p = deployed_params(&ArchConfig::new(arch, Alpha::ONE)).unwrap();
        let log = (p as f64).log10();
        assert!(
            (log - arch.paper_log10_params()).abs() < 0.02,
            "{arch}: {p} params, log10 {log:.4} vs paper {}",
            arch.paper_log10_params()
        );
    }
    // The exact counts documented in each builder.
    let exact = |arch| deployed_params(&ArchConfig::new(arch, Alpha::ONE)).unwrap();
    assert_eq!(exact(Arch::Unet), 31_030_658);
    assert_eq!(exact(Arch::Fcn), 35_693_388);
    assert_eq!(exact(Arch::Cumed), 7_637_260);
}

#[test]
fn width_scaling_is_roughly_quadratic_and_monotone() {
    for arch in Arch::ALL {
        let base = deployed_params(&ArchConfig::new(arch, Alpha::ONE)).unwrap() as f64;
        let mut prev = f64::INFINITY;
        for den in [2u32, 4, 8, 16, 32] {
            let a = Alpha::new(1, den).unwrap();
            let p = deployed_params(&ArchConfig::new(arch, a)).unwrap() as f64;
            assert!(p < prev, "{arch} α=1/{den} not smaller");
            prev = p;
            let ratio = p / (base * a.value() * a.value());
            // Input and classifier layers do not scale, so small α sits above α².
            assert!(
                (0.95..1.6).contains(&ratio),
                "{arch} α=1/{den} ratio {ratio}"
            );
        }
    }
}

#[test]
fn graphs_have_valid_shapes_for_their_input_multiple() {
    for arch in Arch::ALL {
        for bn in [false, true] {
            for in_channels in [1, 3] {
                let cfg = ArchConfig {
                    in_channels,
                    batch_norm: bn,
                    ..ArchConfig::new(arch, alpha("1/8"))
                };
                let nodes = build(&cfg).unwrap();
                assert!(nodes.len() <= MAX_NODES);
                let g = Graph::new(&nodes).unwrap();
                let side = arch.input_multiple() * 4;
                let mut shapes = vec![Shape::default(); nodes.len()];
                g.infer_shapes(side, side + arch.input_multiple(), &mut shapes)
                    .unwrap();
                let out = shapes.last().unwrap();
                assert_eq!(
                    (out.c, out.h, out.w),
                    (1, side, side + arch.input_multiple())
                );
                assert!(matches!(nodes.last(), Some(Op::Argmax { .. })));
                // Logits have `classes` channels.
                assert_eq!(shapes[nodes.len() - 2].c, 2);
                // A size that is not a multiple fails cleanly.
                assert!(arch.check_input(side + 1, side).is_err());
                assert!(arch.check_input(side, side).is_ok());
            }
        }
    }
}

#[test]
fn batch_norm_variant_deploys_to_the_plain_network() {
    for arch in Arch::ALL {
        let plain = ArchConfig::new(arch, alpha("1/4"));
        let bn = ArchConfig {
            batch_norm: true,
            ..plain
        };
        let g_bn = build(&bn).unwrap();
        let bn_nodes = g_bn
            .iter()
            .filter(|o| matches!(o, Op::BatchNorm { .. }))
            .count();
        assert!(bn_nodes > 0);
        // conv without bias + (gamma, beta) = conv with bias + one extra per channel.
        let p_bn = Graph::new(&g_bn).unwrap().trainable_params();
        let p_plain = deployed_params(&plain).unwrap();
        let bn_channels: u64 = g_bn
            .iter()
            .map(|o| match o {
                Op::BatchNorm { channels, .. } => u64::from(*channels),
                _ => 0,
            })
            .sum();
        assert_eq!(p_bn, p_plain + bn_channels);
        assert_eq!(deployed_params(&bn).unwrap(), p_plain);
    }
}

#[test]
fn bad_configurations_are_clear_errors() {
    assert!("resnet".parse::<Arch>().is_err());
    assert_eq!("U-Net".parse::<Arch>().unwrap(), Arch::Unet);
    let tiny = ArchConfig::new(Arch::Unet, Alpha::new(1, 256).unwrap());
    assert_eq!(
        build(&tiny).unwrap_err(),
        ModelError::Alpha(AlphaError::ZeroChannels { base: 64 })
    );
    // 64 · 1/128 = 0.5 rounds up to one channel.
    assert!(build(&ArchConfig::new(Arch::Unet, Alpha::new(1, 128).unwrap())).is_ok());
    let no_classes = ArchConfig {
        classes: 1,
        ..ArchConfig::new(Arch::Fcn, Alpha::ONE)
    };
    assert_eq!(build(&no_classes).unwrap_err(), ModelError::TooFewClasses);
    let no_input = ArchConfig {
        in_channels: 0,
        ..ArchConfig::new(Arch::Cumed, Alpha::ONE)
    };
    assert_eq!(build(&no_input).unwrap_err(), ModelError::NoInputChannels);
}
