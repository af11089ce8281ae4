//! `ccnet arch`: what an architecture costs at a width multiplier.

use ccnet_models::{Arch, ArchConfig};
use ccnet_shared::alpha::Alpha;
use clap::Args;

use super::values;
use crate::report::{summarize, ArchSummary};

/// Arguments of `ccnet arch`.
#[derive(Debug, Args)]
pub struct ArchArgs {
    /// Architecture: unet, fcn or cumed.
    #[arg(value_parser = values::arch)]
    pub arch: Arch,
    /// Width multiplier, e.g. 1/8 or 0.125 (0 < α ≤ 1).
    #[arg(long, default_value = "1", value_parser = values::alpha, allow_hyphen_values = true)]
    pub alpha: Alpha,
    /// Input size HxW (multiples of 16 for unet, 32 for fcn, 8 for cumed).
    #[arg(long, default_value = "256x256", value_parser = values::size)]
    pub input: (u32, u32),
    /// Input channels (1 gray, 3 RGB).
    #[arg(long, default_value_t = 1)]
    pub channels: u32,
    /// Output classes.
    #[arg(long, default_value_t = 2)]
    pub classes: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `ccnet arch`.
pub fn run(a: &ArchArgs) -> anyhow::Result<()> {
    let cfg = ArchConfig {
        in_channels: a.channels,
        classes: a.classes,
        ..ArchConfig::new(a.arch, a.alpha)
    };
    let s = summarize(&cfg, a.input.0, a.input.1)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", table(&s));
    }
    Ok(())
}

/// Groups digits in threes: 31030658 → 31,030,658.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// The human-readable summary.
pub fn table(s: &ArchSummary) -> String {
    format!(
        "{arch} at alpha {alpha}, input {h}x{w}x{c}, {k} classes\n\
         parameters          {p} (log10 P = {lp:.3})\n\
         MACs per image      {macs}\n\
         peak activations    {af} bytes as f32, {ai} bytes as int8\n\
         weights             {wf} bytes at 32 bits, {wh} at 16 bits, {wi} at 8 bits\n",
        arch = s.arch,
        alpha = s.alpha,
        h = s.height,
        w = s.width,
        c = s.in_channels,
        k = s.classes,
        p = thousands(s.params),
        lp = s.log10_params,
        macs = thousands(s.macs),
        af = thousands(s.peak_activation_bytes_f32),
        ai = thousands(s.peak_activation_bytes_int8),
        wf = thousands(s.weight_bytes_f32),
        wh = thousands(s.weight_bytes_f16),
        wi = thousands(s.weight_bytes_int8),
    )
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(31030658), "31,030,658");
    }
}
