//! Byte sizes as people write them (`60MB`, `57MiB`, `1.5GB`): size budgets and file sizes.

/// Why a size did not parse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SizeError {
    #[error("bad size '{0}' (e.g. 60MB, 57MiB, 1.5GB)")]
    Number(String),
    #[error("unknown size unit '{unit}' in '{size}'")]
    Unit { size: String, unit: String },
    #[error("size '{0}' must be at least one byte")]
    TooSmall(String),
}

/// Parses a size: `60MB`, `60M`, `57MiB`, `1.5GB`, or a byte count.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| SizeError::Number(s.to_string()))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(SizeError::Unit {
                size: s.to_string(),
                unit: other.to_string(),
            });
        }
    };
    let bytes = number * scale;
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err(SizeError::TooSmall(s.to_string()));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("60MB").unwrap(), 60_000_000);
        assert_eq!(parse_size("60 M").unwrap(), 60_000_000);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("2MiB").unwrap(), 2 * 1024 * 1024);
        assert_eq!(parse_size("12345").unwrap(), 12345);
        for bad in ["", "MB", "60XB", "-3MB", "0"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
