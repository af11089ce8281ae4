//! Size and cost summaries of an architecture, computed from the graph alone.

use ccnet_models::{build, deployed_params, ArchConfig, ModelError};
use ccnet_shared::graph::{Graph, Shape};
use ccnet_shared::plan::peak_activation_bytes;
use serde::Serialize;

/// What an architecture costs at one width multiplier and input size.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ArchSummary {
    /// Architecture name.
    pub arch: String,
    /// Width multiplier as written (`1/8`).
    pub alpha: String,
    /// Input channels.
    pub in_channels: u32,
    /// Classes.
    pub classes: u32,
    /// Input height.
    pub height: u32,
    /// Input width.
    pub width: u32,
    /// Trainable parameters of the deployed network (batch norm folded).
    pub params: u64,
    /// log10 of `params`.
    pub log10_params: f64,
    /// Multiply-accumulates of one forward pass.
    pub macs: u64,
    /// Peak live activation bytes at 4 bytes per element (f32).
    pub peak_activation_bytes_f32: u64,
    /// Peak live activation bytes at 1 byte per element (int8).
    pub peak_activation_bytes_int8: u64,
    /// Bytes of the weights at 32 bits per parameter.
    pub weight_bytes_f32: u64,
    /// Bytes of the weights at 16 bits per parameter.
    pub weight_bytes_f16: u64,
    /// Bytes of the weights at 8 bits per parameter.
    pub weight_bytes_int8: u64,
    /// Nodes in the deployed graph.
    pub nodes: usize,
}

/// Errors computing a summary.
#[derive(Debug, thiserror::Error)]
pub enum SummaryError {
    /// The network cannot be built.
    #[error("{0}")]
    Model(ModelError),
    /// The graph cannot run at this size.
    #[error("{0}")]
    Graph(ccnet_shared::graph::GraphError),
}

/// Summarises the deployed (batch-norm-free) network for `cfg` on `height × width` input.
pub fn summarize(cfg: &ArchConfig, height: u32, width: u32) -> Result<ArchSummary, SummaryError> {
    cfg.arch
        .check_input(height, width)
        .map_err(SummaryError::Model)?;
    let plain = ArchConfig {
        batch_norm: false,
        ..*cfg
    };
    let nodes = build(&plain).map_err(SummaryError::Model)?;
    let graph = Graph::new(&nodes).map_err(SummaryError::Graph)?;
    let stats = graph.stats(height, width).map_err(SummaryError::Graph)?;
    let mut shapes = vec![Shape::default(); nodes.len()];
    graph
        .infer_shapes(height, width, &mut shapes)
        .map_err(SummaryError::Graph)?;
    let peak = |b| {
        peak_activation_bytes(&graph, &shapes, b)
            .map(|p| p.bytes)
            .map_err(SummaryError::Graph)
    };
    let params = deployed_params(cfg).map_err(SummaryError::Model)?;
    Ok(ArchSummary {
        arch: cfg.arch.name().to_string(),
        alpha: cfg.alpha.to_string(),
        in_channels: cfg.in_channels,
        classes: cfg.classes,
        height,
        width,
        params,
        log10_params: (params as f64).log10(),
        macs: stats.macs,
        peak_activation_bytes_f32: peak(4)?,
        peak_activation_bytes_int8: peak(1)?,
        weight_bytes_f32: params * 4,
        weight_bytes_f16: params * 2,
        weight_bytes_int8: params,
        nodes: nodes.len(),
    })
}
