//! Byte counts as people read them in messages: `1.4 GiB`, `340.0 MiB`, `12.0 KiB`, `512 B`.

use std::fmt;

/// A byte count that displays in the largest binary unit it reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u32, &str); 4] = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")];
        for (shift, unit) in UNITS {
            if self.0 >= 1 << shift {
                return write!(f, "{:.1} {unit}", self.0 as f64 / (1u64 << shift) as f64);
            }
        }
        write!(f, "{} B", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::Size;

    #[test]
    fn sizes_read_in_the_largest_unit_they_reach() {
        assert_eq!(Size(512).to_string(), "512 B");
        assert_eq!(Size(12 << 10).to_string(), "12.0 KiB");
        assert_eq!(Size(340 << 20).to_string(), "340.0 MiB");
        // The figure of the report: 755,092,754,918 bytes.
        assert_eq!(Size(755_092_754_918).to_string(), "703.2 GiB");
        assert_eq!(Size(3 << 40).to_string(), "3.0 TiB");
    }
}
