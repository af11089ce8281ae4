//! Value parsers shared by every subcommand, so that `--alpha`, budgets, sizes and
//! architecture names mean the same everywhere.

use ccnet_models::Arch;
use ccnet_shared::alpha::Alpha;

/// Parses a width multiplier (`1/8`, `0.125`).
pub fn alpha(s: &str) -> Result<Alpha, String> {
    Alpha::parse(s).map_err(|e| format!("`{s}`: {e}"))
}

/// Parses an architecture name.
pub fn arch(s: &str) -> Result<Arch, String> {
    s.parse().map_err(|e| format!("`{s}`: {e}"))
}

/// Parses a byte budget (`1MB`, `256KiB`, `750000`).
pub fn budget(s: &str) -> Result<u64, String> {
    ccnet_shared::budget::parse_bytes(s).map_err(|e| format!("`{s}`: {e}"))
}

/// Parses an image size `HxW` (or a single side for a square).
pub fn size(s: &str) -> Result<(u32, u32), String> {
    let err = || format!("`{s}`: expected a size like 256x256 or 256");
    let parse = |t: &str| t.trim().parse::<u32>().ok().filter(|&v| v > 0);
    match s.split_once(['x', 'X']) {
        Some((h, w)) => Ok((parse(h).ok_or_else(err)?, parse(w).ok_or_else(err)?)),
        None => parse(s).map(|v| (v, v)).ok_or_else(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(size("256x128"), Ok((256, 128)));
        assert_eq!(size("64"), Ok((64, 64)));
        assert!(size("0x5").is_err());
        assert!(size("ax5").is_err());
        assert!(size("").is_err());
    }

    #[test]
    fn errors_name_the_value() {
        assert!(alpha("2").unwrap_err().contains("`2`"));
        assert!(budget("1mb").unwrap_err().contains("unknown unit"));
        assert!(arch("resnet").unwrap_err().contains("unet, fcn, cumed"));
    }
}
